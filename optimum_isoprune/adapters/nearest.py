"""What to tell a user whose model is refused: the nearest supported family and what it would still need.

Known families are a table (what is missing was found by trying them); anything else is matched by structure.
"""

from __future__ import annotations

from torch import nn

_TIMM_VIT = "timm vit_* / deit3_* (VisionTransformer)"
_HF_VIT = "transformers ViTForImageClassification"
_NEEDS_CLASS = "a pruned checkpoint class in optimum_isoprune/modeling that records its per-layer widths"

# timm class (module.name) or transformers model_type -> (nearest supported family, what is missing).
KNOWN_GAPS: dict[str, tuple[str, str]] = {
    "levit": (
        _HF_VIT,
        f"{_NEEDS_CLASS}; its q / k / v are one linear + BatchNorm layer laid out head by head (key and value dims "
        "differ), its attention biases are indexed by head on the first dim, and subsampling attention between "
        "stages changes width and resolution",
    ),
}


# timm classes pruned unwrapped whose attention runs in a pruned form (modeling/timm_attention.py; Swin V2's
# `_window_attention_forward` in adapters/swin.py), which the pruned TimmWrapperForImageClassification checkpoint class
# does not switch to.
UNWRAPPED_ONLY: dict[str, str] = {
    "timm.models.beit.Beit": "timm beit_*",
    "timm.models.eva.Eva": "timm eva02_*",
    "timm.models.swin_transformer_v2.SwinTransformerV2": "timm swinv2_*",
}


def _key(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "model_type", None):
        return config.model_type
    return f"{type(model).__module__}.{type(model).__name__}"


def nearest_family(model: nn.Module) -> tuple[str, str]:
    """(nearest supported family, what is missing) for a model no adapter supports."""
    inner = getattr(model, "timm_model", None)  # TimmWrapperForImageClassification: the wrapped model decides
    if isinstance(inner, nn.Module) and _key(inner) in UNWRAPPED_ONLY:
        return (
            f"{UNWRAPPED_ONLY[_key(inner)]}, unwrapped",
            "a pruned wrapper checkpoint that runs its attention in the pruned form; prune model.timm_model directly",
        )
    if isinstance(inner, nn.Module):
        family, missing = nearest_family(inner)
        return f"TimmWrapperForImageClassification around {family}", missing
    if _key(model) in KNOWN_GAPS:
        return KNOWN_GAPS[_key(model)]
    modules = list(model.modules())
    if any(isinstance(m, nn.MultiheadAttention) for m in modules) or any(
        hasattr(m, "num_heads") or hasattr(m, "num_attention_heads") for m in modules
    ):
        return (
            _TIMM_VIT,
            "an adapter that knows its attention layout (projection names, head count attribute) "
            "and a way to save its pruned widths",
        )
    if any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in modules):
        return (
            "timm efficientnet_* / mobilenetv3_* / regnety_*",
            "an adapter naming its classifier and a way to save its pruned widths",
        )
    if any(isinstance(m, nn.Conv2d) for m in modules):
        return ("timm resnet* / convnext_*", "an adapter naming its classifier and a way to save its pruned widths")
    return (_TIMM_VIT, "image-classifier structure: no attention or convolution was found")
