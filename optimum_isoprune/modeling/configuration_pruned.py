"""Configurations of pruned checkpoints: the stock architecture's own fields plus the pruned widths.

This file travels with every saved checkpoint (``register_for_auto_class``), so it imports only
the standard library and transformers. A pruned config keeps every field of the architecture it
was pruned from unchanged (they describe the stock model that is built first) and adds:

* ``base_model_type``: the stock ``model_type`` (e.g. ``"vit"``);
* ``pruned_shapes``: ``{module name: {parameter or buffer name: shape}}`` for every tensor whose
  shape differs from the stock model built from the same fields;
* ``pruned_attributes``: ``{module name: {attribute: value}}`` for every plain attribute that
  differs (attention ``num_attention_heads`` / ``head_dim`` / ``scaling``, ``in_features``,
  ``groups``, ``normalized_shape``...);
* ``pruned_checksums``: sha256 of every tensor and of the two mappings above, checked at load time;
* per-family summary fields (per-layer heads, MLP widths, stage widths) for people reading
  ``config.json``; the model is built from the two generic mappings above, never from these.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar

from transformers import (
    BeitConfig,
    CLIPConfig,
    CLIPVisionConfig,
    ConvNextConfig,
    ConvNextV2Config,
    Data2VecVisionConfig,
    DeiTConfig,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    EfficientNetConfig,
    LevitConfig,
    MobileNetV2Config,
    PreTrainedConfig,
    RegNetConfig,
    ResNetConfig,
    SiglipConfig,
    SwinConfig,
    Swinv2Config,
    TimmWrapperConfig,
    ViTConfig,
)


def _is_int_list(value: Any, depth: int = 1) -> bool:
    """True when `value` is a (nested, `depth` levels) list of ints."""
    if not isinstance(value, (list, tuple)):
        return False
    if depth == 1:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return all(_is_int_list(v, depth - 1) for v in value)


def _check_mapping(name: str, value: Any, leaf_ok: Any, leaf_desc: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) and all(isinstance(a, str) and leaf_ok(b) for a, b in v.items())
        for k, v in value.items()
    ):
        raise TypeError(
            f"{name} must map module names to {{name: {leaf_desc}}}, got {value!r:.300}. "
            "Build pruned configs with optimum_isoprune.modeling.to_pruned_model instead of by hand."
        )


def _is_attribute_value(value: Any) -> bool:
    if isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float)) for v in value)


class PrunedConfigMixin(PreTrainedConfig):
    """Fields and checks shared by every pruned config; subclass it together with a stock config."""

    base_config_class: ClassVar[type[PreTrainedConfig]] = PreTrainedConfig
    # Per-family summary fields and how many list levels each has (validated in __post_init__).
    summary_fields: ClassVar[dict[str, int]] = {}

    base_model_type: str | None = None
    base_model_name_or_path: str | None = None
    pruned_shapes: dict[str, dict[str, list[int]]] | None = None
    pruned_attributes: dict[str, dict[str, Any]] | None = None
    # sha256 of the weights and of the two mappings above, written at save time and checked at load time.
    pruned_checksums: dict[str, str] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "model_type" in vars(cls):  # a concrete pruned config: saving it copies this file beside the weights
            cls.register_for_auto_class("AutoConfig")

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.base_model_type is None:
            self.base_model_type = self.base_config_class.model_type
        _check_mapping("pruned_shapes", self.pruned_shapes, lambda s: _is_int_list(s), "list of ints")
        _check_mapping("pruned_attributes", self.pruned_attributes, _is_attribute_value, "number or list of numbers")
        for name, depth in self.summary_fields.items():
            value = getattr(self, name, None)
            if value is not None and not (_is_int_list(value, depth) if depth else isinstance(value, int)):
                kind = "an int" if depth == 0 else f"a list nested {depth} deep of ints"
                raise TypeError(f"{type(self).__name__}.{name} must be {kind}, got {value!r:.200}.")

    def to_base_config(self) -> PreTrainedConfig:
        """The stock config (e.g. `ViTConfig`) describing the architecture before pruning."""
        base_fields = {f.name for f in fields(self.base_config_class)}
        own_fields = {f.name for f in fields(type(self))} - base_fields
        data = {k: v for k, v in self.to_dict().items() if k not in own_fields and k not in ("model_type", "auto_map")}
        data["architectures"] = None
        return self.base_config_class.from_dict(data)


class _ViTWidthsMixin(PrunedConfigMixin):
    summary_fields: ClassVar[dict[str, int]] = {
        "pruned_hidden_size": 0,
        "layer_num_heads": 1,
        "layer_head_dims": 1,
        "layer_intermediate_sizes": 1,
    }

    pruned_hidden_size: int | None = None
    layer_num_heads: list[int] | None = None
    layer_head_dims: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None


class _ConvNextWidthsMixin(PrunedConfigMixin):
    summary_fields: ClassVar[dict[str, int]] = {"stage_hidden_sizes": 1, "stage_intermediate_sizes": 2}

    stage_hidden_sizes: list[int] | None = None
    stage_intermediate_sizes: list[list[int]] | None = None


class PrunedViTConfig(_ViTWidthsMixin, ViTConfig):
    """A ViT with per-layer heads, head dims and MLP widths (and possibly a narrower residual)."""

    model_type = "pruned_vit"
    base_config_class: ClassVar[type[PreTrainedConfig]] = ViTConfig


class PrunedDeiTConfig(_ViTWidthsMixin, DeiTConfig):
    """A DeiT (with or without distillation token) with per-layer widths."""

    model_type = "pruned_deit"
    base_config_class: ClassVar[type[PreTrainedConfig]] = DeiTConfig


class PrunedDeiTWithTeacherConfig(PrunedDeiTConfig):
    """A DeiT with distillation token and head; its own `model_type` so Auto classes pick the right head."""

    model_type = "pruned_deit_with_teacher"


class PrunedDinov2Config(_ViTWidthsMixin, Dinov2Config):
    """A DINOv2 with per-layer heads, head dims and MLP (or SwiGLU) widths, and a narrower residual."""

    model_type = "pruned_dinov2"
    base_config_class: ClassVar[type[PreTrainedConfig]] = Dinov2Config


class PrunedDinov2WithRegistersConfig(_ViTWidthsMixin, Dinov2WithRegistersConfig):
    """A DINOv2 with register tokens, with per-layer widths."""

    model_type = "pruned_dinov2_with_registers"
    base_config_class: ClassVar[type[PreTrainedConfig]] = Dinov2WithRegistersConfig


class PrunedBeitConfig(_ViTWidthsMixin, BeitConfig):
    """A BEiT with per-layer heads (and bias-table columns), head dims and MLP widths, and a narrower residual."""

    model_type = "pruned_beit"
    base_config_class: ClassVar[type[PreTrainedConfig]] = BeitConfig


class PrunedData2VecVisionConfig(_ViTWidthsMixin, Data2VecVisionConfig):
    """A data2vec-vision with per-layer widths, like a pruned BEiT."""

    model_type = "pruned_data2vec_vision"
    base_config_class: ClassVar[type[PreTrainedConfig]] = Data2VecVisionConfig


class PrunedCLIPConfig(_ViTWidthsMixin, CLIPConfig):
    """A CLIP image classifier whose vision tower has per-layer heads, head dims and MLP widths, and a narrower
    residual (the text tower's fields are kept as they were: the classifier builds no text tower)."""

    model_type = "pruned_clip"
    base_config_class: ClassVar[type[PreTrainedConfig]] = CLIPConfig


class PrunedSiglipConfig(_ViTWidthsMixin, SiglipConfig):
    """A SigLIP image classifier whose vision tower has per-layer widths and a narrower residual."""

    model_type = "pruned_siglip"
    base_config_class: ClassVar[type[PreTrainedConfig]] = SiglipConfig


# Backbones without a head (pruned on their features): their own model types, so Auto classes and
# `load_pruned_model` build the backbone class, never a classifier.


class PrunedViTModelConfig(_ViTWidthsMixin, ViTConfig):
    """A ViT backbone (`ViTModel`) with per-layer widths and a narrower residual."""

    model_type = "pruned_vit_model"
    base_config_class: ClassVar[type[PreTrainedConfig]] = ViTConfig


class PrunedDinov2ModelConfig(_ViTWidthsMixin, Dinov2Config):
    """A DINOv2 backbone (`Dinov2Model`) with per-layer widths and a narrower residual."""

    model_type = "pruned_dinov2_model"
    base_config_class: ClassVar[type[PreTrainedConfig]] = Dinov2Config


class PrunedCLIPVisionConfig(_ViTWidthsMixin, CLIPVisionConfig):
    """A CLIP vision tower (`CLIPVisionModel`) with per-layer widths and a narrower residual."""

    model_type = "pruned_clip_vision_model"
    base_config_class: ClassVar[type[PreTrainedConfig]] = CLIPVisionConfig


class PrunedConvNextConfig(_ConvNextWidthsMixin, ConvNextConfig):
    """A ConvNeXt with per-stage residual widths and per-block MLP widths."""

    model_type = "pruned_convnext"
    base_config_class: ClassVar[type[PreTrainedConfig]] = ConvNextConfig


class PrunedConvNextV2Config(_ConvNextWidthsMixin, ConvNextV2Config):
    """A ConvNeXt V2 with per-stage residual widths and per-block MLP (and GRN) widths."""

    model_type = "pruned_convnextv2"
    base_config_class: ClassVar[type[PreTrainedConfig]] = ConvNextV2Config


class PrunedResNetConfig(PrunedConfigMixin, ResNetConfig):
    """A ResNet with per-stage output widths and per-block inner widths."""

    model_type = "pruned_resnet"
    base_config_class: ClassVar[type[PreTrainedConfig]] = ResNetConfig
    summary_fields: ClassVar[dict[str, int]] = {
        "pruned_embedding_size": 0,
        "stage_hidden_sizes": 1,
        "stage_block_widths": 3,
    }

    pruned_embedding_size: int | None = None
    stage_hidden_sizes: list[int] | None = None
    stage_block_widths: list[list[list[int]]] | None = None


class PrunedMobileNetV2Config(PrunedConfigMixin, MobileNetV2Config):
    """A MobileNetV2 with per-block expanded and output channel widths."""

    model_type = "pruned_mobilenet_v2"
    base_config_class: ClassVar[type[PreTrainedConfig]] = MobileNetV2Config
    summary_fields: ClassVar[dict[str, int]] = {
        "block_expanded_channels": 1,
        "block_out_channels": 1,
        "pruned_last_channels": 0,
    }

    block_expanded_channels: list[int] | None = None
    block_out_channels: list[int] | None = None
    pruned_last_channels: int | None = None


class PrunedRegNetConfig(PrunedConfigMixin, RegNetConfig):
    """A RegNet with per-stage output widths and per-block inner widths (conv groups keep their count)."""

    model_type = "pruned_regnet"
    base_config_class: ClassVar[type[PreTrainedConfig]] = RegNetConfig
    summary_fields: ClassVar[dict[str, int]] = {
        "pruned_embedding_size": 0,
        "stage_hidden_sizes": 1,
        "stage_block_widths": 3,
        "stage_block_squeeze_widths": 2,
    }

    pruned_embedding_size: int | None = None
    stage_hidden_sizes: list[int] | None = None
    stage_block_widths: list[list[list[int]]] | None = None
    stage_block_squeeze_widths: list[list[int]] | None = None


class PrunedEfficientNetConfig(PrunedConfigMixin, EfficientNetConfig):
    """An EfficientNet with per-block expanded, squeeze-and-excitation and output widths, and a narrower top conv."""

    model_type = "pruned_efficientnet"
    base_config_class: ClassVar[type[PreTrainedConfig]] = EfficientNetConfig
    summary_fields: ClassVar[dict[str, int]] = {
        "block_expanded_channels": 1,
        "block_squeeze_channels": 1,
        "block_out_channels": 1,
        "pruned_hidden_dim": 0,
    }

    block_expanded_channels: list[int] | None = None
    block_squeeze_channels: list[int] | None = None
    block_out_channels: list[int] | None = None
    pruned_hidden_dim: int | None = None


class PrunedSwinConfig(PrunedConfigMixin, SwinConfig):
    """A Swin Transformer with per-layer heads and MLP widths (and narrower stages)."""

    model_type = "pruned_swin"
    base_config_class: ClassVar[type[PreTrainedConfig]] = SwinConfig
    summary_fields: ClassVar[dict[str, int]] = {"layer_num_heads": 1, "layer_intermediate_sizes": 1}

    layer_num_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None


class PrunedSwinv2Config(PrunedConfigMixin, Swinv2Config):
    """A Swin Transformer V2 with per-layer heads and MLP widths (and narrower stages)."""

    model_type = "pruned_swinv2"
    base_config_class: ClassVar[type[PreTrainedConfig]] = Swinv2Config
    summary_fields: ClassVar[dict[str, int]] = {"layer_num_heads": 1, "layer_intermediate_sizes": 1}

    layer_num_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None


class PrunedLevitConfig(PrunedConfigMixin, LevitConfig):
    """A LeViT with per-attention heads (and attention-bias rows) and per-MLP hidden widths; stage widths kept."""

    model_type = "pruned_levit"
    base_config_class: ClassVar[type[PreTrainedConfig]] = LevitConfig
    summary_fields: ClassVar[dict[str, int]] = {"layer_num_heads": 1, "layer_intermediate_sizes": 1}

    layer_num_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None


class PrunedLevitWithTeacherConfig(PrunedLevitConfig):
    """A LeViT with distillation head; its own `model_type` so Auto classes pick the right head."""

    model_type = "pruned_levit_with_teacher"


class PrunedTimmWrapperConfig(PrunedConfigMixin, TimmWrapperConfig):
    """A timm model wrapped by `TimmWrapperForImageClassification`, with pruned widths."""

    model_type = "pruned_timm_wrapper"
    base_config_class: ClassVar[type[PreTrainedConfig]] = TimmWrapperConfig
    summary_fields: ClassVar[dict[str, int]] = {"layer_num_heads": 1, "layer_intermediate_sizes": 1}

    # config.json doubles as the image processor config of timm checkpoints; this names its class.
    image_processor_type: str | None = "TimmWrapperImageProcessor"
    layer_num_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None


__all__ = [
    "PrunedBeitConfig",
    "PrunedCLIPConfig",
    "PrunedConfigMixin",
    "PrunedConvNextConfig",
    "PrunedConvNextV2Config",
    "PrunedData2VecVisionConfig",
    "PrunedDeiTConfig",
    "PrunedDeiTWithTeacherConfig",
    "PrunedDinov2Config",
    "PrunedDinov2WithRegistersConfig",
    "PrunedEfficientNetConfig",
    "PrunedLevitConfig",
    "PrunedLevitWithTeacherConfig",
    "PrunedMobileNetV2Config",
    "PrunedRegNetConfig",
    "PrunedResNetConfig",
    "PrunedSiglipConfig",
    "PrunedSwinConfig",
    "PrunedSwinv2Config",
    "PrunedTimmWrapperConfig",
    "PrunedViTConfig",
]
