"""From importance scores to the channels to remove (steps 4 and the MACs/params budget).

Units (channels, heads, head dims) are ranked within their class only; a ratio per class says how
many of its units go. `solve` finds the ratio that lands a MACs or params target within tolerance,
re-using the scores (nothing is re-estimated per trial; each trial is arithmetic on the cost model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .counting import CostModel
from .errors import BudgetError
from .importance import unit_scores
from .isomorphic import IsomorphicClass, PrunableGroup

BISECTION_STEPS = 40
MAX_RATIO = 0.9999


@dataclass(eq=False)
class ClassRanking:
    """The units of one class sorted by importance, ready to answer "what stays at ratio r?"."""

    cls: IsomorphicClass
    counts: np.ndarray  # units per group
    min_keep: np.ndarray  # units every group keeps at least
    round_to: int
    group_of_rank: np.ndarray  # group index of the k-th least important unit of the class
    local_order: list[np.ndarray]  # per group: its units from least to most important

    @classmethod
    def build(cls, iso_class: IsomorphicClass, scores: dict[PrunableGroup, torch.Tensor], round_to: int,
              min_heads: int) -> "ClassRanking":
        per_group = [unit_scores(g, scores[g], iso_class.heads).numpy() for g in iso_class.groups]
        counts = np.array([len(s) for s in per_group])
        floor = min_heads if iso_class.heads else round_to
        concat = np.concatenate(per_group)
        owner = np.repeat(np.arange(len(per_group)), counts)
        return cls(
            cls=iso_class,
            counts=counts,
            min_keep=np.minimum(floor, counts),
            round_to=1 if iso_class.heads else round_to,
            group_of_rank=owner[np.argsort(concat, kind="stable")],
            local_order=[np.argsort(s, kind="stable") for s in per_group],
        )

    def kept(self, ratio: float) -> np.ndarray:
        total = len(self.group_of_rank)
        count = total - int(total * (1.0 - ratio))  # torch-pruning's convention, so the paper's ratios carry over
        removed = np.bincount(self.group_of_rank[:count], minlength=len(self.counts))
        kept = self.counts - removed
        if self.round_to > 1:
            kept = np.where(removed > 0, kept - kept % self.round_to, kept)
        return np.maximum(kept, self.min_keep)


@dataclass
class Plan:
    """Root channels to remove from each group, with the resulting per-class amounts."""

    removed: dict[PrunableGroup, np.ndarray]
    ratios: dict[IsomorphicClass, float]
    kept_units: dict[IsomorphicClass, np.ndarray]


class Budget:
    """Turns per-class ratios into plans and plans into MACs / params."""

    def __init__(self, rankings: list[ClassRanking], groups: list[PrunableGroup], cost: CostModel):
        self.rankings = rankings
        self.groups = groups
        self.cost = cost
        self.sizes = {t.key: len(t.root_idxs) for g in groups for t in g.targets}

    def plan(self, ratios: dict[IsomorphicClass, float]) -> Plan:
        kept_units = {r.cls: r.kept(ratios[r.cls]) for r in self.rankings}
        heads: dict[PrunableGroup, np.ndarray] = {}
        channels: dict[PrunableGroup, np.ndarray] = {}
        for ranking in self.rankings:
            for group, order, kept in zip(ranking.cls.groups, ranking.local_order, kept_units[ranking.cls]):
                (heads if ranking.cls.heads else channels)[group] = order[: len(order) - kept]
        removed = {}
        for group in self.groups:
            mask = np.zeros(group.width, dtype=bool)
            if group.attention is None:
                mask[channels.get(group, [])] = True
            else:
                grid = mask.reshape(group.attention.num_heads, group.attention.head_dim)
                grid[heads.get(group, []), :] = True
                grid[:, channels.get(group, [])] = True
            removed[group] = np.flatnonzero(mask)
        return Plan(removed, dict(ratios), kept_units)

    def removed_channels(self, plan: Plan) -> dict[tuple[int, bool], int]:
        counts: dict[tuple[int, bool], int] = {}
        for group, idxs in plan.removed.items():
            if len(idxs) == 0:
                continue
            mask = np.zeros(group.width, dtype=bool)
            mask[idxs] = True
            for target in group.targets:
                counts[target.key] = counts.get(target.key, 0) + int(mask[target.root_idxs].sum())
        return counts

    def macs(self, plan: Plan) -> int:
        return self.cost.macs(self.removed_channels(plan))

    def params(self, plan: Plan) -> int:
        return self.cost.params(self.removed_channels(plan), self.sizes)


def shared_ratios(rankings: list[ClassRanking], ratio: float, head_ratio: float | None,
                  head_dim_ratio: float | None) -> dict[IsomorphicClass, float]:
    """One ratio for every class; heads and head dims follow it unless fixed by the user."""
    ratios = {}
    for r in rankings:
        is_head_dim = not r.cls.heads and all(g.attention is not None for g in r.cls.groups)
        fixed = head_ratio if r.cls.heads else (head_dim_ratio if is_head_dim else None)
        ratios[r.cls] = ratio if fixed is None else fixed
    return ratios


def solve(
    budget: Budget,
    metric: Callable[[Plan], int],
    target: float,
    ratios_at: Callable[[float], dict[IsomorphicClass, float]],
    name: str,
    tolerance: float = 0.005,
) -> Plan:
    """The plan whose `metric` (MACs or params) is closest to `target`.

    Bisection on the shared ratio first; when the steps of rounded widths leave it further than
    `tolerance` away, one class at a time is pushed a little further and the closest result kept.
    """
    start, end = budget.plan(ratios_at(0.0)), budget.plan(ratios_at(MAX_RATIO))
    before, smallest = metric(start), metric(end)
    if target > before:
        raise BudgetError(f"target_{name}={target:.4g} is above the model's {name} ({before:.4g}); "
                          f"pick a target below {before:.4g}.")
    if target < smallest:
        raise BudgetError(f"target_{name}={target:.4g} is below the smallest reachable {name} ({smallest:.4g}) "
                          "with every layer kept at its minimum width; raise the target or lower round_to/min_heads.")
    lo, hi = 0.0, MAX_RATIO  # metric(lo) >= target >= metric(hi)
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        if metric(budget.plan(ratios_at(mid))) >= target:
            lo = mid
        else:
            hi = mid
    candidates = [budget.plan(ratios_at(lo)), budget.plan(ratios_at(hi))]
    best = min(candidates, key=lambda p: abs(metric(p) - target))
    if abs(metric(best) - target) / target <= tolerance:
        return best
    base = candidates[0].ratios
    for cls in base:
        lo_c, hi_c = base[cls], MAX_RATIO
        for _ in range(BISECTION_STEPS):
            mid = (lo_c + hi_c) / 2
            if metric(budget.plan({**base, cls: mid})) >= target:
                lo_c = mid
            else:
                hi_c = mid
        for ratio in (lo_c, hi_c):
            plan = budget.plan({**base, cls: ratio})
            if abs(metric(plan) - target) < abs(metric(best) - target):
                best = plan
    return best
