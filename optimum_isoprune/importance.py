"""Per-channel importance of every group (step 3 of the method), estimated once per pruning run."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from .errors import NonFiniteError
from .guards import require_finite
from .isomorphic import PrunableGroup
from .objectives import importance_loss

logger = logging.getLogger(__name__)


def accumulate_gradients(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    logits_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    total: int | None = None,
    objective: str = "logits",
) -> int:
    """Sum the gradients of `objectives.importance_loss` over calibration batches; returns the batch count.

    Logits (`objective="logits"`): cross-entropy, on the model's own predictions for batches without labels.
    Features (a backbone, `objective="features"`: `logits_fn` returns its features): their energy, labels unused.
    """
    model.zero_grad(set_to_none=True)
    count = 0
    for pixel_values, labels in tqdm(batches, total=total, desc="Calibration (Taylor importance)", leave=False):
        where = f"of calibration batch {count}"
        logits = logits_fn(model, pixel_values)
        require_finite(
            logits.detach(),
            "The model's logits" if objective == "logits" else "The model's features",
            where,
            "The weights or the inputs overflow; check the model (model.float()) and the data's scale.",
        )
        loss = importance_loss(logits, labels, objective, where)
        require_finite(loss.detach(), "The calibration loss", where)
        loss.backward()
        count += 1
    for parameter in model.parameters():  # off the logits' path (CLIP's post_layernorm): no effect, no importance
        if parameter.requires_grad and parameter.grad is None and count:
            parameter.grad = torch.zeros_like(parameter)
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            require_finite(
                parameter.grad,
                f"The gradient of {name}",
                "after calibration",
                "Taylor importance needs finite gradients; try importance='magnitude' or smaller inputs.",
            )
    return count


def channel_scores(groups: list[PrunableGroup], criterion: str, seed: int) -> dict[PrunableGroup, torch.Tensor]:
    """One score per root channel of each group; higher means more important.

    "taylor" needs gradients accumulated first (`accumulate_gradients`); scores are mean-normalised
    within each group, as in the paper's reference code.
    """
    if criterion == "random":
        generator = torch.Generator().manual_seed(seed)
        return {g: torch.rand(g.width, generator=generator) for g in groups}
    scorer = (
        tp.importance.GroupTaylorImportance() if criterion == "taylor" else tp.importance.GroupMagnitudeImportance(p=2)
    )
    scores = {}
    for group in groups:
        score = scorer(group.tp_group)
        if score is None or score.numel() != group.width:
            raise RuntimeError(f"Could not score group {group.name}: got {None if score is None else score.shape}.")
        score = score.detach().float().cpu()
        if bool(torch.isinf(score).any()):
            raise NonFiniteError(
                f"Importance scores of group {group.name} hold inf (the weights or gradients overflow)."
            )
        scores[group] = torch.nan_to_num(score, nan=0.0)  # 0/0 of a group whose scores are all zero
    return scores


def unit_scores(group: PrunableGroup, scores: torch.Tensor, heads: bool) -> torch.Tensor:
    """Scores of the units a class ranks: channels, or for attention groups heads / head dims.

    Head dims are coupled across heads (the same dim index leaves every head of a layer), so a
    head-dim score is the mean over heads; a head's score is the mean over its dims.
    """
    if group.attention is None:
        # Grouped convolutions: one offset leaves every conv group, so its score is the mean over groups.
        return scores.view(group.channel_groups, -1).mean(0) if group.channel_groups > 1 else scores
    per_head = scores.view(group.attention.num_heads, group.attention.head_dim)
    return per_head.mean(1) if heads else per_head.mean(0)
