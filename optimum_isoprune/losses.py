"""Per-example label losses for hard (class index) and soft (mixup / cutmix probability) targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .guards import require_finite
from .metrics import IGNORE_INDEX


def is_soft(targets: torch.Tensor) -> bool:
    """Whether `targets` are per-class probabilities (B, C) rather than class indices (B,)."""
    return targets.is_floating_point() and targets.dim() == 2


def label_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-example cross-entropy of `logits` against class indices or soft targets.

    Class indices use `label_smoothing` and give 0 where the label is `IGNORE_INDEX`. Soft targets (what timm's
    `Mixup` returns, smoothing already folded in) give `-sum(targets * log_softmax(logits))`, timm's
    `SoftTargetCrossEntropy` before its mean.
    """
    if is_soft(targets):
        if targets.shape != logits.shape:
            raise ValueError(
                f"Soft targets have shape {tuple(targets.shape)} but the logits {tuple(logits.shape)}; "
                "build them for the model's number of classes (e.g. timm Mixup(num_classes=...))."
            )
        require_finite(targets, "The soft targets", "of the batch", "Check the mixup / cutmix settings.")
        return -(targets.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    return F.cross_entropy(
        logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none", label_smoothing=label_smoothing
    )
