"""Architecture adapters: the only place that knows model families."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .backbones import BACKBONE_ADAPTERS
from .base import Attention, AttentionLayout, ModelAdapter
from .beit import BeitAdapter
from .clip import ClipAdapter
from .dinov2 import Dinov2Adapter
from .io import ModelIO
from .levit import LevitAdapter, LevitTimmAdapter
from .nearest import nearest_family
from .swin import SwinTimmAdapter, SwinTransformersAdapter, Swinv2TimmAdapter, Swinv2TransformersAdapter
from .timm_models import TimmAdapter
from .timm_vits import BeitTimmAdapter, EvaTimmAdapter
from .transformers_models import TimmWrapperAdapter, TransformersAdapter, is_backbone, model_type

ADAPTERS: list[type[ModelAdapter]] = [
    TransformersAdapter,
    TimmWrapperAdapter,
    TimmAdapter,
    SwinTransformersAdapter,
    SwinTimmAdapter,
    Swinv2TransformersAdapter,
    Swinv2TimmAdapter,
    Dinov2Adapter,
    ClipAdapter,
    BeitAdapter,
    BeitTimmAdapter,
    EvaTimmAdapter,
    LevitAdapter,
    LevitTimmAdapter,
    *BACKBONE_ADAPTERS,
]


def get_adapter(model: nn.Module) -> ModelAdapter:
    """Return the adapter for `model`, or raise `UnsupportedModelError` naming what is supported."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected a torch.nn.Module, got {type(model).__name__}.")
    for adapter_cls in ADAPTERS:
        if adapter_cls.supports(model):
            gap = adapter_cls.variant_gap(model)
            if gap is not None:
                raise UnsupportedModelError(f"{type(model).__name__} {gap}")
            return adapter_cls(model)
    supported = "; ".join(a.describe_supported() for a in ADAPTERS)
    classifier = _classifier_of_backbone(model)
    if classifier is not None:
        backbones = ", ".join(name for a in BACKBONE_ADAPTERS for name in a.model_types.values())
        raise UnsupportedModelError(
            f"{type(model).__name__} has no classification head, and is not one of the backbones pruned on their "
            f"features ({backbones}). Prune the classifier ({classifier}), whose head is kept whole."
        )
    family, missing = nearest_family(model)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported by the isomorphic pruner. Nearest supported family: {family}; "
        f"missing: {missing}. Supported: {supported}."
    )


def _classifier_of_backbone(model: nn.Module) -> str | None:
    """The supported classifier of a bare transformers backbone's model type (ResNetModel: ResNetForImageClassification)."""
    if not is_backbone(model):
        return None
    names = [getattr(a, "model_types", {}).get(model_type(model)) for a in ADAPTERS if a not in BACKBONE_ADAPTERS]
    return next((n for n in names if n), None)


def adapter_for(model: nn.Module) -> ModelIO:
    """The model's adapter, or a plain `ModelIO` for a classifier the pruner does not know (calling it, its input
    size, channels, normalisation and labels work for any transformers or timm classifier)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected a torch.nn.Module, got {type(model).__name__}.")
    adapter_cls = next((a for a in ADAPTERS if a.supports(model)), ModelIO)
    return adapter_cls(model)


__all__ = ["ADAPTERS", "Attention", "AttentionLayout", "ModelAdapter", "ModelIO", "adapter_for", "get_adapter"]
