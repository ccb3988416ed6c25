"""From importance scores to the channels to remove (steps 4 and the MACs/params budget).

Units (channels, heads, head dims) are ranked within their class only; a ratio per class says how
many of its units go. `solve` finds the ratio that lands a MACs or params target within tolerance,
re-using the scores (nothing is re-estimated per trial; each trial is arithmetic on the cost model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from .counting import CostModel
from .errors import BudgetError
from .importance import unit_scores
from .isomorphic import IsomorphicClass, PrunableGroup

BISECTION_STEPS = 40  # the allocate policy's threshold needs the fine resolution
CLASS_BISECTION_STEPS = 24  # one class's ratio: finer than one unit in 2^24
REFINEMENT_ROUNDS = 3
MAX_RATIO = 0.9999


@dataclass(eq=False)
class ClassRanking:
    """The units of one class sorted by importance, ready to answer "what stays at ratio r?"."""

    isoclass: IsomorphicClass
    counts: np.ndarray  # units per group
    min_keep: np.ndarray  # units every group keeps at least
    round_to: int
    group_of_rank: np.ndarray  # group index of the k-th least important unit of the class
    local_order: list[np.ndarray]  # per group: its units from least to most important
    normalized: np.ndarray  # the class's scores divided by its median, ascending
    raw_sorted: np.ndarray  # the class's scores, ascending (what global ranking compares across classes)
    widths: list[np.ndarray] | None = None  # per group: the widths worth keeping, ascending (from a latency model)

    @classmethod
    def build(
        cls, isoclass: IsomorphicClass, scores: dict[PrunableGroup, torch.Tensor], round_to: int, min_heads: int
    ) -> "ClassRanking":
        per_group = [unit_scores(g, scores[g], isoclass.heads).numpy() for g in isoclass.groups]
        counts = np.array([len(s) for s in per_group])
        if not isoclass.heads:  # a unit of a grouped conv is one channel per conv group: round the channel count
            round_to = max(round_to // math.gcd(round_to, g.channel_groups) for g in isoclass.groups)
        floor = min_heads if isoclass.heads else round_to
        concat = np.concatenate(per_group)
        owner = np.repeat(np.arange(len(per_group)), counts)
        median = float(np.median(concat))
        scale = median if median > 0 else float(np.mean(np.abs(concat))) or 1.0
        return cls(
            isoclass=isoclass,
            counts=counts,
            min_keep=np.minimum(floor, counts),
            round_to=1 if isoclass.heads else round_to,
            group_of_rank=owner[np.argsort(concat, kind="stable")],
            local_order=[np.argsort(s, kind="stable") for s in per_group],
            normalized=np.sort(concat / scale) + np.arange(len(concat)) * 1e-9,  # strictly increasing
            raw_sorted=np.sort(concat),
        )

    def kept(self, ratio: float) -> np.ndarray:
        total = len(self.group_of_rank)
        count = total - int(total * (1.0 - ratio))  # torch-pruning's convention, so the paper's ratios carry over
        removed = np.bincount(self.group_of_rank[:count], minlength=len(self.counts))
        kept = self.counts - removed
        if self.round_to > 1:
            kept = np.where(removed > 0, kept - kept % self.round_to, kept)
        kept = np.maximum(kept, self.min_keep)
        if self.widths is not None:  # snap up to the next width that is worth keeping
            kept = np.array([w[min(np.searchsorted(w, k), len(w) - 1)] for w, k in zip(self.widths, kept)])
        return kept


# (layer, is_out_dim) -> original indices removed from that dimension of the layer
RemovedIndices = dict[tuple[nn.Module, bool], np.ndarray]


@dataclass
class Plan:
    """Root channels to remove from each group, with the resulting per-class amounts."""

    removed: dict[PrunableGroup, np.ndarray]
    ratios: dict[IsomorphicClass, float]
    kept_units: dict[IsomorphicClass, np.ndarray]
    removed_channels: dict[tuple[int, bool], int]  # (id(layer or parameter), is_out_dim) -> channels removed

    def removed_indices(self) -> RemovedIndices:
        """The original indices each Linear / Conv2d / norm loses on its input or output dimension (bare
        parameters left out): what surgery removes, and what reconstruction refits."""
        removed: RemovedIndices = {}
        for group, root_removed in self.removed.items():
            if len(root_removed) == 0:
                continue
            for target in group.targets:
                if isinstance(target.target, nn.Parameter):
                    continue
                idxs = target.removed(root_removed)
                key = (target.target, target.is_out)
                removed[key] = np.union1d(removed[key], idxs) if key in removed else idxs
        return removed


class Budget:
    """Turns per-class ratios into plans and plans into MACs / params."""

    def __init__(self, rankings: list[ClassRanking], groups: list[PrunableGroup], cost: CostModel):
        self.rankings = rankings
        self.groups = groups
        self.cost = cost
        self.sizes = {t.key: len(t.root_idxs) for g in groups for t in g.targets}
        # bare per-head parameters (bias tables, logit scales) lose one entry per removed head
        self.sizes.update(
            {(id(p), True): g.attention.num_heads for g in groups if g.attention for p in g.attention.head_parameters()}
        )
        self._cache: dict[tuple[int, int, int], tuple[np.ndarray, dict[tuple[int, bool], int]]] = {}

    def plan(self, ratios: dict[IsomorphicClass, float]) -> Plan:
        kept_units = {r.isoclass: r.kept(ratios[r.isoclass]) for r in self.rankings}
        heads: dict[PrunableGroup, np.ndarray] = {}
        channels: dict[PrunableGroup, np.ndarray] = {}
        for ranking in self.rankings:
            for group, order, kept in zip(ranking.isoclass.groups, ranking.local_order, kept_units[ranking.isoclass]):
                (heads if ranking.isoclass.heads else channels)[group] = order[: len(order) - kept]
        removed, counts = {}, {}
        for group in self.groups:
            group_heads, group_channels = heads.get(group, ()), channels.get(group, ())
            idxs, group_counts = self._removal(group, group_heads, group_channels)
            removed[group] = idxs
            for key, count in group_counts.items():
                counts[key] = counts.get(key, 0) + count
        return Plan(removed, dict(ratios), kept_units, counts)

    def _removal(self, group: PrunableGroup, heads, channels) -> tuple[np.ndarray, dict[tuple[int, bool], int]]:
        """Root channels a group loses, and how many each of its layers loses; cached, since a unit's
        order inside its group is fixed, the removal depends only on how many heads/channels go."""
        key = (id(group), len(heads), len(channels))
        if key not in self._cache:
            mask = np.zeros(group.width, dtype=bool)
            if group.attention is None:
                mask.reshape(group.channel_groups, -1)[:, channels] = True
            else:
                grid = mask.reshape(group.attention.num_heads, group.attention.head_dim)
                grid[heads, :] = True
                grid[:, channels] = True
            counts = {t.key: int(mask[t.root_idxs].sum()) for t in group.targets} if mask.any() else {}
            if group.attention is not None and len(heads):  # per-head parameters and layers (position-bias MLP outputs)
                counts.update({(id(t), True): len(heads) for t in group.attention.head_targets()})
            self._cache[key] = (np.flatnonzero(mask), counts)
        return self._cache[key]

    def macs(self, plan: Plan) -> int:
        return self.cost.macs(plan.removed_channels)

    def params(self, plan: Plan) -> int:
        return self.cost.params(plan.removed_channels, self.sizes)


def shared_ratios(
    rankings: list[ClassRanking], ratio: float, head_ratio: float | None, head_dim_ratio: float | None
) -> dict[IsomorphicClass, float]:
    """One ratio for every class; heads and head dims follow it unless fixed by the user."""
    fixed = {"heads": head_ratio, "head_dims": head_dim_ratio}
    ratios = {}
    for r in rankings:
        unit_ratio = fixed.get(r.isoclass.unit)
        ratios[r.isoclass] = ratio if unit_ratio is None else unit_ratio
    return ratios


class Allocation:
    """Per-class ratios from one threshold on importance per unit of cost (the "allocate" policy).

    Scores are made comparable across classes by dividing each class by its median; a unit goes when
    its normalised score is below `threshold * cost`, where `cost` is the MACs (or params) one unit
    of its class saves. Classes whose units are cheap to keep and unimportant lose the most; ranking
    inside each class is unchanged. `ratios_at(t)` sweeps the threshold from nothing (t=0) to
    everything (t=1), so `solve` can bisect it like a shared ratio.
    """

    def __init__(self, budget: Budget, metric: Callable[[Plan], int], fixed: dict[IsomorphicClass, float]):
        self.rankings = [r for r in budget.rankings if r.isoclass not in fixed]
        self.fixed = fixed
        zero = {r.isoclass: 0.0 for r in budget.rankings} | fixed
        full = metric(budget.plan(zero))
        self.cost = {}
        for r in self.rankings:
            plan = budget.plan({**zero, r.isoclass: 0.5})
            units = int(r.counts.sum() - plan.kept_units[r.isoclass].sum())
            self.cost[r.isoclass] = max(full - metric(plan), 1) / max(units, 1)
        self.ranks = {r.isoclass: np.arange(1, len(r.normalized) + 1, dtype=float) for r in self.rankings}
        self.top = max((r.normalized[-1] / self.cost[r.isoclass] for r in self.rankings), default=0.0) * 1.001

    def ratios_at(self, t: float) -> dict[IsomorphicClass, float]:
        threshold = t * self.top
        ratios = dict(self.fixed)
        for r in self.rankings:
            # Units in rank order along the normalised scores (ties spread by rank): a continuous sweep.
            removed = np.interp(threshold * self.cost[r.isoclass], r.normalized, self.ranks[r.isoclass], left=0.0)
            ratios[r.isoclass] = min(float(removed) / len(r.normalized), MAX_RATIO)
        return ratios


def solve(
    budget: Budget,
    metric: Callable[[Plan], int],
    target: float,
    ratios_at: Callable[[float], dict[IsomorphicClass, float]],
    name: str,
    pinned: frozenset[IsomorphicClass] = frozenset(),
    tolerance: float = 0.005,
) -> Plan:
    """The plan whose `metric` (MACs or params) is closest to `target`.

    Bisection along `ratios_at` first; when the steps of rounded widths leave it further than
    `tolerance` away, one class at a time moves to where it crosses the target (a few rounds of
    coordinate descent) and the closest result is kept. `pinned` classes (ratios the user fixed) never move.
    """
    start, end = budget.plan(ratios_at(0.0)), budget.plan(ratios_at(MAX_RATIO))
    before, smallest = metric(start), metric(end)
    if target > before:
        raise BudgetError(
            f"target_{name}={target:.4g} is above the model's {name} ({before:.4g}); pick a target below {before:.4g}."
        )
    if target < smallest:
        raise BudgetError(
            f"target_{name}={target:.4g} is below the smallest reachable {name} ({smallest:.4g}) "
            "with every layer kept at its minimum width; raise the target or lower round_to/min_heads."
        )
    lo, hi = _crossing(lambda r: metric(budget.plan(ratios_at(r))), target)
    above = budget.plan(ratios_at(lo))  # metric(above) >= target: approach the target from above
    best = min((above, budget.plan(ratios_at(hi))), key=lambda p: abs(metric(p) - target))
    free = [c for c in above.ratios if c not in pinned]

    def close_enough(plan: Plan) -> bool:
        return abs(metric(plan) - target) / target <= tolerance

    # Coarse classes can jump over the target; let one of them step back and the others close the gap.
    starts = [above] + [
        budget.plan({**above.ratios, c: r}) for c in free for r in (above.ratios[c] / 2, 0.0) if above.ratios[c] > 0
    ]
    for start in starts:
        best = min(
            (best, _descend(budget, metric, target, start, free, tolerance)), key=lambda p: abs(metric(p) - target)
        )
        if close_enough(best):
            break
    return best


def _descend(
    budget: Budget,
    metric: Callable[[Plan], int],
    target: float,
    above: Plan,
    free: list[IsomorphicClass],
    tolerance: float,
) -> Plan:
    """Coordinate descent from a plan at or above the target: each class in turn prunes up to its crossing."""
    best = above
    for _ in range(REFINEMENT_ROUNDS):
        for isoclass in free:
            if abs(metric(best) - target) / target <= tolerance:
                return best
            base = above.ratios
            lo_c, hi_c = _crossing(lambda r: metric(budget.plan({**base, isoclass: r})), target, CLASS_BISECTION_STEPS)
            closer = budget.plan({**base, isoclass: lo_c})
            if target <= metric(closer) < metric(above):
                above = closer
            best = min((best, above, budget.plan({**base, isoclass: hi_c})), key=lambda p: abs(metric(p) - target))
    return best


def _crossing(f: Callable[[float], int], target: float, steps: int = BISECTION_STEPS) -> tuple[float, float]:
    """Bisection on a non-increasing step function: the ratios just before and after it passes `target`."""
    lo, hi = 0.0, MAX_RATIO
    if f(lo) < target:
        return lo, lo
    for _ in range(steps):
        mid = (lo + hi) / 2
        if f(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo, hi
