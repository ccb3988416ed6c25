"""Checks shared by pruning and distillation: finite numbers, usable labels, and the caller's random state and model
hooks left alone."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import ConfigurationError, NonFiniteError

F = TypeVar("F", bound=Callable[..., Any])
IGNORE_INDEX = -100


def keeps_global_rng(function: F) -> F:
    """Run `function` on a fork of torch's global RNG (CPU and initialised CUDA devices): seeding inside it does not
    change the random numbers the caller draws afterwards."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def with_autograd(function: F) -> F:
    """Run `function` with autograd on, also when the caller is under `torch.no_grad()` or `torch.inference_mode()`
    (tracing the dependency graph and Taylor importance need gradients)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(False), torch.enable_grad():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextmanager
def hooks_removed(handles: list[RemovableHandle]) -> Iterator[None]:
    """Remove the hooks `handles` when the block ends, however it ends (a model is never left hooked)."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def count_non_finite(tensor: torch.Tensor) -> int:
    if not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor)).sum())


def require_finite(tensor: torch.Tensor, what: str, where: str, hint: str = "") -> None:
    """Raise `NonFiniteError` naming `what` and `where` when `tensor` holds NaN or inf."""
    bad = count_non_finite(tensor)
    if bad:
        raise NonFiniteError(
            f"{what} {where} holds {bad} NaN/inf value(s) of {tensor.numel()}.{' ' + hint if hint else ''}"
        )


def check_finite_parameters(model: nn.Module, what: str) -> None:
    """Raise `NonFiniteError` naming the first parameters that hold NaN or inf."""
    bad = [(name, count_non_finite(p.detach())) for name, p in model.named_parameters() if not p.is_meta]
    bad = [(name, n) for name, n in bad if n]
    if bad:
        listed = ", ".join(f"{name} ({n})" for name, n in bad[:3])
        raise NonFiniteError(
            f"{what} has {len(bad)} parameter(s) holding NaN/inf values: {listed}. Fix or reload the weights first; "
            "importance scores and distillation would be meaningless."
        )


def image_size_error(image_size: int, native: int | None, error: Exception) -> ConfigurationError:
    """The error for a model that failed to run at a configured `image_size` other than its own (`native`)."""
    return ConfigurationError(
        f"The model does not run on {image_size} px images (image_size={image_size}; it was built for {native} px): "
        f"{str(error).splitlines()[0] if str(error) else type(error).__name__} Leave image_size unset, or resize the "
        "images to the model's size."
    )


def check_labels(
    labels: torch.Tensor,
    num_classes: int | None,
    where: str,
    error: type[Exception] = ValueError,
    allow_all_ignored: bool = False,
) -> None:
    """Labels must be whole class indices in [0, num_classes), or -100 (ignored); at least one must be used unless
    `allow_all_ignored`."""
    if labels.is_floating_point():
        if count_non_finite(labels) or not bool(torch.equal(labels, labels.round())):
            raise error(
                f"Labels {where} are not whole numbers (e.g. {labels.flatten()[:4].tolist()}); give integer "
                "class indices."
            )
    if labels.dtype == torch.bool or labels.is_complex():
        raise error(f"Labels {where} are of dtype {labels.dtype}; give integer class indices.")
    used = labels[labels != IGNORE_INDEX]
    if used.numel() == 0 and allow_all_ignored:
        return
    if used.numel() == 0:
        raise error(
            f"Every label {where} is {IGNORE_INDEX} (ignored): the loss would be 0/0 (NaN). Give labelled "
            "examples, or no labels at all (the model's own predictions are then used)."
        )
    low, high = int(used.min()), int(used.max())
    if low < 0 and num_classes is None:
        raise error(f"Labels {where} include {low}: class indices start at 0 ({IGNORE_INDEX} = ignored).")
    if low < 0 or (num_classes is not None and high >= num_classes):
        raise error(
            f"Labels {where} range over {low}..{high}, but the model has {num_classes} classes (0.."
            f"{None if num_classes is None else num_classes - 1}; {IGNORE_INDEX} = ignored). Check the label "
            "column, or give a model with the dataset's number of classes."
        )


__all__ = [
    "keeps_global_rng",
    "with_autograd",
    "hooks_removed",
    "require_finite",
    "check_finite_parameters",
    "check_labels",
    "count_non_finite",
    "image_size_error",
    "NonFiniteError",
]
