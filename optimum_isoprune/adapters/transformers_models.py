"""Adapters for transformers image classifiers (and timm models wrapped by `TimmWrapperForImageClassification`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .base import Attention, AttentionLayout, ModelAdapter
from .io import vision_config
from .timm_models import TIMM_ATTENTION, TimmAdapter

TRANSFORMERS_ATTENTION = AttentionLayout(
    projections=("q_proj", "k_proj", "v_proj"),
    output="o_proj",
    num_heads_attr="num_attention_heads",
    head_dim_attr="head_dim",
)

# model_type -> what the model is, for error messages and the README's support table.
SUPPORTED_MODEL_TYPES = {
    "vit": "ViTForImageClassification",
    "deit": "DeiTForImageClassification, DeiTForImageClassificationWithTeacher",
    "convnext": "ConvNextForImageClassification",
    "convnextv2": "ConvNextV2ForImageClassification",
    "resnet": "ResNetForImageClassification",
    "mobilenet_v2": "MobileNetV2ForImageClassification",
    "regnet": "RegNetForImageClassification",
    "efficientnet": "EfficientNetForImageClassification",
}


def _is_pretrained_model(model: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def is_backbone(model: nn.Module) -> bool:
    """Whether a transformers model is a bare backbone (`ViTModel`, what `AutoModel` builds), not a model with a
    head; a pruned class counts as the stock class it resizes."""
    if not _is_pretrained_model(model):
        return False
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    names = {n for v in MODEL_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    return any(c.__name__ in names for c in type(model).__mro__)


def model_type(model: nn.Module) -> str:
    """The architecture's model_type; a pruned checkpoint reports the type it was pruned from."""
    return getattr(model.config, "base_model_type", None) or model.config.model_type


class TransformersAdapter(ModelAdapter):
    """transformers `*ForImageClassification` models listed in `SUPPORTED_MODEL_TYPES`."""

    attention_layouts = (TRANSFORMERS_ATTENTION,)
    classifier_names = ("classifier", "cls_classifier", "distillation_classifier")
    model_types: dict[str, str] = SUPPORTED_MODEL_TYPES

    @classmethod
    def supports(cls, model: nn.Module, backbone: bool = False) -> bool:
        """Models of `model_types` with a head (`backbone=True`: bare backbones, `adapters/backbones.py`)."""
        return _is_pretrained_model(model) and model_type(model) in cls.model_types and is_backbone(model) == backbone

    @classmethod
    def describe_supported(cls) -> str:
        return "transformers: " + ", ".join(cls.model_types.values())

    def image_size(self) -> int:
        size = getattr(vision_config(self.model.config), "image_size", None) or 224
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def num_channels(self) -> int:
        return int(getattr(vision_config(self.model.config), "num_channels", 3))

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        logits = getattr(model(pixel_values=pixel_values), "logits", None)
        if logits is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} returns no logits: it has no classification head. Prune the classifier "
                "(AutoModelForImageClassification / ...ForImageClassification), whose head is kept whole."
            )
        return logits

    def make_traceable(self, model: nn.Module) -> None:
        if self.attentions(model):
            model.set_attn_implementation("eager")

    def restore(self, model: nn.Module, reference: nn.Module) -> None:
        original = reference.config._attn_implementation
        if self.attentions(model) and original and original != "eager":
            model.set_attn_implementation(original)

    def base_model_name(self) -> str | None:
        return getattr(self.model.config, "_name_or_path", None) or None


class TimmWrapperAdapter(TransformersAdapter):
    """`TimmWrapperForImageClassification`: a transformers shell around a timm model."""

    attention_layouts = (TIMM_ATTENTION,)
    model_types = {"timm_wrapper": "TimmWrapperForImageClassification"}

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return super().supports(model) and TimmAdapter.supports(model.timm_model)

    @classmethod
    def describe_supported(cls) -> str:
        return "TimmWrapperForImageClassification around a supported timm model"

    @classmethod
    def variant_gap(cls, model: nn.Module) -> str | None:
        return TimmAdapter.variant_gap(model.timm_model) or super().variant_gap(model)

    def _timm(self) -> TimmAdapter:
        return TimmAdapter(self.model.timm_model)

    def image_size(self) -> int:
        return self._timm().image_size()

    def num_channels(self) -> int:
        return self._timm().num_channels()

    def classifiers(self, model: nn.Module) -> list[nn.Module]:
        return self._timm().classifiers(model.timm_model)

    def attentions(self, model: nn.Module) -> list[Attention]:
        return self._timm().attentions(model)

    def graph_options(self, model: nn.Module) -> dict[str, Any]:
        return self._timm().graph_options(model)

    def make_traceable(self, model: nn.Module) -> None:
        self._timm().make_traceable(model.timm_model)

    def restore(self, model: nn.Module, reference: nn.Module) -> None:
        self._timm().restore(model.timm_model, reference.timm_model)

    def finalize(self, model: nn.Module) -> None:
        self._timm().finalize(model.timm_model)
