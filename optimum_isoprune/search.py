"""The "search" budget policy: how much each isomorphic class loses, chosen on calibration loss.

Ranking inside each class is fixed (scores are computed once); a candidate split only changes how
many units of each class go. Every candidate hits the MACs / params target (the budget solver places
it) and is scored by the distillation loss KL(original || candidate) on held-out calibration batches,
forward passes only. Candidates are evaluated without surgery, by masking the removed channels on the
unpruned model: exact for MLP neurons, conv channels, heads and head dims (zeroing a channel at its
consumers, or q/k/v outputs inside attention, computes exactly what removing it computes);
an approximation for a residual width read through LayerNorm, whose statistics still see every channel.

The search starts from the better of the shared split (one ratio for every class, the paper) and
global ranking's amounts, then does coordinate descent on per-class weights: class c loses
min(1, w_c * s) of its units, s solved to hit the target; each step doubles or halves one weight,
steps shrink when a sweep finds nothing better. The result never scores worse than its starts.

With reconstruction on, each candidate is scored after the same refit the final model gets (its cost
is one reconstruction per candidate). `search_finalists=N` trades quality for time: candidates are
ranked on the masked model without refit and only the starts and the N best are rescored with it.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .budget import MAX_RATIO, Budget, ClassRanking, Plan, solve
from .errors import NonFiniteError
from .guards import hooks_removed
from .isomorphic import IsomorphicClass, PrunableGroup
from .layers import channels, mixes_channels
from .objectives import divergence, reference

logger = logging.getLogger(__name__)

Ratios = dict[IsomorphicClass, float]
MIN_WEIGHT = 1e-3


@dataclass
class SearchSummary:
    """Scores (KL to the original model on held-out calibration images, or for a backbone the relative squared
    error of its features; lower is better) of the starts and the result."""

    start_scores: dict[str, float] = field(default_factory=dict)
    chosen_score: float | None = None
    chosen_start: str | None = None
    candidates: int = 0
    rescored: int = 0
    calibration_images: int = 0
    seconds: float = 0.0
    objective: str = "logits"  # what the scores compare (objectives.py): "logits" (KL) or "features"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        starts = ", ".join(f"{k} {v:.4f}" for k, v in self.start_scores.items())
        rescored = f", {self.rescored} rescored after reconstruction" if self.rescored else ""
        measure = "KL to the original" if self.objective == "logits" else "feature error relative to the original"
        return (
            f"searched over {self.candidates} candidate splits from the {self.chosen_start} start{rescored} "
            f"({measure} on {self.calibration_images} held-out images: {starts}; chosen {self.chosen_score:.4f})"
        )


class ChannelMasks:
    """Zero the channels a plan would remove, on the unpruned model, through forward hooks (no surgery)."""

    def __init__(self, groups: Sequence[PrunableGroup]):
        self.groups = groups
        self.masks: dict[tuple[nn.Module, bool], torch.Tensor] = {}
        self.consumers: dict[tuple[nn.Module, bool], np.ndarray] = {}  # channel-mixing layers' zeroed inputs

    def set_plan(self, plan: Plan) -> None:
        masks: dict[tuple[nn.Module, bool], torch.Tensor] = {}
        consumers: dict[tuple[nn.Module, bool], np.ndarray] = {}
        for group in self.groups:
            removed = plan.removed.get(group)
            if removed is None or len(removed) == 0:
                continue
            for target in group.targets:
                idxs = target.removed(removed)
                key = (target.target, target.is_out)
                if not target.is_out and mixes_channels(target.target):
                    consumers[key] = np.union1d(consumers.get(key, idxs), idxs)
                if not self._masked(group, target):
                    continue
                if key not in masks:
                    masks[key] = torch.ones(channels(target.target, target.is_out))
                masks[key][idxs] = 0.0
        self.masks, self.consumers = masks, consumers

    @staticmethod
    def _masked(group: PrunableGroup, target) -> bool:
        """Attention: q / k / v outputs (exact for heads and head dims); elsewhere: the inputs of channel-mixing layers."""
        if group.attention is not None:
            return target.is_out and any(target.target is p for p in group.attention.projections)
        return not target.is_out and mixes_channels(target.target)

    @contextmanager
    def applied(self) -> Iterator[None]:
        handles = []
        for (layer, is_out), mask in self.masks.items():
            if is_out:
                handles.append(layer.register_forward_hook(_scale_output(mask)))
            else:
                handles.append(layer.register_forward_pre_hook(_scale_input(mask)))
        with hooks_removed(handles):
            yield


def _shape(mask: torch.Tensor, like: torch.Tensor, channel_dim: int) -> torch.Tensor:
    shape = [1] * like.dim()
    shape[channel_dim] = -1
    return mask.to(like.device, like.dtype).view(shape)


def _scale_output(mask: torch.Tensor):
    def hook(module, inputs, output):
        return output * _shape(mask, output, 1 if isinstance(module, nn.Conv2d) else -1)

    return hook


def _scale_input(mask: torch.Tensor):
    def hook(module, inputs):
        x = inputs[0]
        return (x * _shape(mask, x, 1 if isinstance(module, nn.Conv2d) else -1), *inputs[1:])

    return hook


class CalibrationLoss:
    """KL(original || masked candidate) on held-out batches; the original's log-probabilities are computed once.
    A backbone (`objective="features"`) is scored on the relative squared error of its features instead
    (`objectives.divergence`).

    With `refit` (a callable that reconstructs the masked model in place, given the zeroed consumer
    inputs), each candidate is scored after the same reconstruction the final model gets; the
    weights it changes are put back afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        masks: ChannelMasks,
        batches: Sequence[torch.Tensor],
        logits: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        refit: Callable[[dict[tuple[nn.Module, bool], np.ndarray]], Any] | None = None,
        objective: str = "logits",
    ):
        self.model, self.masks, self.batches, self.logits, self.refit = model, masks, batches, logits, refit
        self.objective = objective  # "features": `logits` returns a backbone's features (see objectives.py)
        with torch.no_grad():
            self.reference = [reference(logits(model, x), objective) for x in batches]

    def __call__(self, plan: Plan, refit: bool = True) -> float:
        """The candidate's loss; `refit=False` skips the reconstruction (the masked model as it is)."""
        self.masks.set_plan(plan)
        refit = refit and self.refit is not None
        saved = {}
        if refit:
            saved = {id(p): (p, p.detach().clone()) for layer, _ in self.masks.consumers for p in layer.parameters()}
        total, count = 0.0, 0
        try:
            with self.masks.applied():
                if refit:
                    self.refit(self.masks.consumers)
                with torch.no_grad():
                    for x, target in zip(self.batches, self.reference):
                        total += divergence(self.logits(self.model, x), target, self.objective)
                        count += len(x)
        finally:
            with torch.no_grad():
                for parameter, value in saved.values():
                    parameter.copy_(value)
        score = total / count
        if not np.isfinite(score):
            raise NonFiniteError("The calibration loss of a candidate split is NaN or inf; check the calibration data.")
        return score


def global_ratios_at(rankings: list[ClassRanking], fixed: Ratios) -> Callable[[float], Ratios]:
    """Global ranking's amounts per class: all non-head units ranked together, as grouping='global' does."""
    free = [r for r in rankings if not r.isoclass.heads and r.isoclass not in fixed]
    scores = np.concatenate([r.raw_sorted for r in free]) if free else np.empty(0)
    owner = np.concatenate([np.full(len(r.raw_sorted), i) for i, r in enumerate(free)]) if free else np.empty(0, int)
    order = owner[np.argsort(scores, kind="stable")]
    sizes = np.array([len(r.raw_sorted) for r in free])

    def ratios_at(t: float) -> Ratios:
        count = len(order) - int(len(order) * (1.0 - t))
        removed = np.bincount(order[:count], minlength=len(free))
        ratios = {r.isoclass: t for r in rankings if r.isoclass.heads}  # heads are a class of their own there too
        ratios.update({r.isoclass: min(removed[i] / sizes[i], MAX_RATIO) for i, r in enumerate(free)})
        return {**ratios, **fixed}

    return ratios_at


def weighted_ratios_at(weights: dict[IsomorphicClass, float], fixed: Ratios) -> Callable[[float], Ratios]:
    """Class c loses min(MAX_RATIO, w_c * s), s = t / (1 - t) sweeping from nothing (t=0) to everything (t->1)."""

    def ratios_at(t: float) -> Ratios:
        scale = t / max(1.0 - t, 1e-12)
        return {**{c: min(MAX_RATIO, w * scale) for c, w in weights.items()}, **fixed}

    return ratios_at


def search_split(
    budget: Budget,
    metric: Callable[[Plan], int],
    target: float,
    name: str,
    starts: dict[str, Callable[[float], Ratios]],
    fixed: Ratios,
    score: CalibrationLoss,
    candidates: int,
    seed: int,
    finalists: int | None,
) -> tuple[Plan, SearchSummary]:
    """The split with the lowest `score` found in at most `candidates` evaluations (see the module docstring).

    When `score` reconstructs and `finalists` is a number below `candidates`, the descent ranks candidates on the masked model
    without reconstruction (one forward pass each) and only the starts and the `finalists` best others are
    rescored after reconstruction; the choice is made on those scores.
    """
    tick = time.perf_counter()
    summary = SearchSummary(objective=score.objective)
    pinned = frozenset(fixed)
    cheap = score.refit is not None and finalists is not None and finalists < candidates
    progress = tqdm(total=candidates + (len(starts) + finalists if cheap else 0), desc="Budget search", leave=False)

    def evaluate(plan: Plan, refit: bool) -> float:
        value = score(plan, refit=refit)
        progress.update()
        return value

    start_plans = {
        label: solve(budget, metric, target, ratios_at, name, pinned=pinned) for label, ratios_at in starts.items()
    }
    explored = {label: evaluate(plan, not cheap) for label, plan in start_plans.items()}
    best_label = min(explored, key=explored.get)
    best = (explored[best_label], start_plans[best_label])
    tried: list[tuple[float, Plan]] = []
    free = [c for c in best[1].ratios if c not in fixed]
    weights = {c: max(best[1].ratios[c], MIN_WEIGHT) for c in free}
    order = list(free)
    np.random.default_rng(seed).shuffle(order)
    evaluated, step = len(starts), 2.0
    seen = {_key(plan) for plan in start_plans.values()}
    while evaluated < candidates and step > 1.05 and len(free) > 1:
        improved = False
        for cls in order:
            for factor in (step, 1.0 / step):
                if evaluated >= candidates:
                    break
                trial = {**weights, cls: max(weights[cls] * factor, MIN_WEIGHT)}
                plan = solve(budget, metric, target, weighted_ratios_at(trial, fixed), name, pinned=pinned)
                if _key(plan) in seen:
                    continue  # rounding gave a split already scored
                seen.add(_key(plan))
                value = evaluate(plan, not cheap)
                evaluated += 1
                tried.append((value, plan))
                if value < best[0]:
                    best, weights, improved = (value, plan), trial, True
                    break
        if not improved:
            step = step**0.5
    summary.start_scores, summary.chosen_start = explored, best_label
    if cheap:  # rescore the starts and the best few others after reconstruction; choose among those
        pool = {label: (evaluate(plan, True), plan) for label, plan in start_plans.items()}
        summary.start_scores = {label: value for label, (value, _) in pool.items()}
        tried.sort(key=lambda entry: entry[0])
        pool.update({f"candidate {i}": (evaluate(plan, True), plan) for i, (_, plan) in enumerate(tried[:finalists])})
        best = min(pool.values(), key=lambda entry: entry[0])
        summary.rescored = len(pool)
    progress.close()
    summary.chosen_score, summary.candidates = best[0], evaluated
    summary.seconds = time.perf_counter() - tick
    return best[1], summary


def _key(plan: Plan) -> tuple:
    return tuple(tuple(int(k) for k in kept) for kept in plan.kept_units.values())
