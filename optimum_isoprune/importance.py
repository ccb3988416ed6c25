"""Per-channel importance of every group (step 3 of the method), estimated once per pruning run."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from .isomorphic import PrunableGroup

logger = logging.getLogger(__name__)


def accumulate_gradients(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    logits_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    total: int | None = None,
) -> int:
    """Sum the cross-entropy gradients of `model` over calibration batches; returns the batch count.

    Batches without labels use the model's own predictions as targets.
    """
    model.zero_grad(set_to_none=True)
    count = 0
    for pixel_values, labels in tqdm(batches, total=total, desc="Calibration (Taylor importance)", leave=False):
        logits = logits_fn(model, pixel_values)
        targets = labels if labels is not None else logits.detach().argmax(-1)
        nn.functional.cross_entropy(logits, targets).backward()
        count += 1
    return count


def channel_scores(groups: list[PrunableGroup], criterion: str, seed: int) -> dict[PrunableGroup, torch.Tensor]:
    """One score per root channel of each group; higher means more important.

    "taylor" needs gradients accumulated first (`accumulate_gradients`); scores are mean-normalised
    within each group, as in the paper's reference code.
    """
    if criterion == "random":
        generator = torch.Generator().manual_seed(seed)
        return {g: torch.rand(g.width, generator=generator) for g in groups}
    scorer = tp.importance.GroupTaylorImportance() if criterion == "taylor" else tp.importance.GroupMagnitudeImportance(p=2)
    scores = {}
    for group in groups:
        score = scorer(group.tp_group)
        if score is None or score.numel() != group.width:
            raise RuntimeError(f"Could not score group {group.name}: got {None if score is None else score.shape}.")
        scores[group] = torch.nan_to_num(score.detach().float().cpu(), nan=0.0)
    return scores


def unit_scores(group: PrunableGroup, scores: torch.Tensor, heads: bool) -> torch.Tensor:
    """Scores of the units a class ranks: channels, or for attention groups heads / head dims.

    Head dims are coupled across heads (the same dim index leaves every head of a layer), so a
    head-dim score is the mean over heads; a head's score is the mean over its dims.
    """
    if group.attention is None:
        return scores
    per_head = scores.view(group.attention.num_heads, group.attention.head_dim)
    return per_head.mean(1) if heads else per_head.mean(0)
