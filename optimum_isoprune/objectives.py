"""The calibration objective, in one place: what the pruned model must keep of the unpruned model's outputs.

The adapter says which output a model is judged on (`ModelAdapter.objective`): the logits of a classifier, or the
features (last hidden state) of a backbone without a classification head; `ModelAdapter.outputs` returns that tensor.
The functions here handle both, for Taylor importance (`importance_loss`) and for the budget search's score
(`reference` once per batch, then `divergence` per candidate).

Features are compared by their relative squared error, ||f - f0||^2 / ||f0||^2 per image (f0: the unpruned model's
features): a head attached afterwards (a linear probe, an MLP, a decoder) reads the features' magnitudes as well as
their directions, which 1 - cosine would ignore; the normalisation makes the score independent of the features'
scale (a pruned model that outputs zeros scores 1), so one number reads the same across backbones; and it is the
quantity the reconstruction step minimises layer by layer, so the two agree on what "better" means.

Taylor importance needs a loss with a gradient at the unpruned model, which any loss against the unpruned model's
own features lacks (it is at its minimum there). Backbones use the features' energy, 1/2 mean(f^2): the first-order
change of this loss when a weight w is removed is -w * dL/dw = -<f, df>, the part of the feature change along the
features themselves, so |w * dL/dw| ranks weights by how much removing them moves the features (as cross-entropy on
the model's own predictions does for a classifier without labels).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import CalibrationDataError
from .guards import check_labels

OBJECTIVES = ("logits", "features")


def _check(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"Unknown calibration objective {objective!r}; expected one of {OBJECTIVES}.")


def importance_loss(outputs: torch.Tensor, labels: torch.Tensor | None, objective: str, where: str) -> torch.Tensor:
    """The loss whose gradients Taylor importance accumulates: cross-entropy on the labels (or on the model's own
    predictions without labels) for logits; the features' energy for features (labels are not used)."""
    _check(objective)
    if objective == "features":
        return 0.5 * outputs.float().square().mean()
    if labels is not None:
        check_labels(labels, outputs.shape[-1], where, CalibrationDataError)
    targets = labels if labels is not None else outputs.detach().argmax(-1)
    return nn.functional.cross_entropy(outputs, targets)


def reference(outputs: torch.Tensor, objective: str) -> torch.Tensor:
    """What `divergence` compares a candidate to, computed once from the unpruned model's outputs."""
    _check(objective)
    outputs = outputs.detach().float()
    return torch.log_softmax(outputs, -1) if objective == "logits" else outputs


def divergence(outputs: torch.Tensor, target: torch.Tensor, objective: str) -> float:
    """Sum over the batch's images of KL(original || candidate) (logits) or of the relative squared feature error
    (features; see `feature_matching_loss`); `target` is `reference(...)` of the unpruned model."""
    _check(objective)
    if objective == "logits":
        student = torch.log_softmax(outputs.float(), -1)
        return float(nn.functional.kl_div(student, target, log_target=True, reduction="sum"))
    return float(feature_matching_loss(outputs, target, reduction="sum"))


def feature_matching_loss(
    features: torch.Tensor, reference_features: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """||f - f0||^2 / ||f0||^2 per image (the backbones' objective, see the module docstring), mean or sum over the
    batch, or per image with `reduction="none"`."""
    if features.shape != reference_features.shape:
        raise ValueError(
            f"Features of shape {tuple(features.shape)} cannot be matched to the original's "
            f"{tuple(reference_features.shape)}."
        )
    dims = tuple(range(1, features.dim()))
    reference_features = reference_features.float()
    error = (features.float() - reference_features).square().sum(dims)
    scale = reference_features.square().sum(dims).clamp_min(torch.finfo(torch.float32).tiny)
    per_image = error / scale
    if reduction == "none":
        return per_image
    return per_image.sum() if reduction == "sum" else per_image.mean()
