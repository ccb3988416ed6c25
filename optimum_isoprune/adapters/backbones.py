"""Backbones without a classification head (transformers `ViTModel`, `Dinov2Model`, `CLIPVisionModel`), pruned on
their features so a user can attach their own head afterwards.

What a backbone adds to its classifier's adapter:
- the objective is "features" (`objectives.py`): calibration compares the pruned model's last hidden state with
  the unpruned model's (Taylor importance, the budget search and its score);
- the features keep their width (hidden size): they are the interface a head is built for, and matching compares
  them channel by channel, so the residual width is not pruned (its group is the one that changes the patch
  embedding's outputs, kept whole like a classifier's); heads, head dims and MLP neurons are;
- every output a user reads is traced (`forward` returns the last hidden state and the pooled output), so the
  pooler's layers are resized with the residual width; the pooler's output channels are the model's interface and
  are kept whole, as a classifier's are (`ViTModel`'s `pooler.dense`; DINOv2's pooled output is its normalised cls
  token, CLIP's is `post_layernorm` of it: both follow the residual width);
- a model is a backbone when it is its own base model (`model.base_model is model`): the classifier adapters take
  only models with a head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .clip import ClipAdapter
from .dinov2 import Dinov2Adapter
from .transformers_models import TransformersAdapter, is_backbone


class _BackboneMixin:
    """Mixed in front of a classifier adapter: the same architecture knowledge, judged on features."""

    objective = "features"
    classifier_names: tuple[str, ...] = ("pooler",)  # ViTModel's pooler.dense: its outputs stay whole
    model_types: dict[str, str]

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return super().supports(model, backbone=True)  # type: ignore[misc, call-arg]

    @classmethod
    def describe_supported(cls) -> str:
        return "transformers backbones (pruned on their features): " + ", ".join(cls.model_types.values())

    def classifiers(self, model: nn.Module) -> list[nn.Module]:
        """Layers whose outputs stay whole: the pooler's (ViTModel) and the patch embedding's (the residual width)."""
        patch_embedding = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        return [*super().classifiers(model), patch_embedding]  # type: ignore[misc]

    def features(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The last hidden state (batch, tokens, hidden): what the objective matches."""
        return model(pixel_values=pixel_values).last_hidden_state

    def forward(self, model: nn.Module, pixel_values: torch.Tensor) -> Any:
        outputs = model(pixel_values=pixel_values)
        pooled = getattr(outputs, "pooler_output", None)
        return (outputs.last_hidden_state,) if pooled is None else (outputs.last_hidden_state, pooled)


class TransformersBackboneAdapter(_BackboneMixin, TransformersAdapter):
    """transformers `ViTModel` (with or without its pooler)."""

    model_types = {"vit": "ViTModel"}


class Dinov2BackboneAdapter(_BackboneMixin, Dinov2Adapter):
    """transformers `Dinov2Model`: layer scales, mask token, SwiGLU MLPs as in the classifier."""

    model_types = {"dinov2": "Dinov2Model"}


class ClipBackboneAdapter(_BackboneMixin, ClipAdapter):
    """transformers `CLIPVisionModel`: its features are the encoder's last hidden state; `post_layernorm` normalises
    the pooled cls token and is traced through the pooled output."""

    model_types = {"clip_vision_model": "CLIPVisionModel"}

    # The model is the tower itself (no `vision_model`, no pooling head to drop) and its pooled output is traced by
    # `forward`: switching attention to eager and back is all it needs.
    make_traceable = TransformersAdapter.make_traceable
    restore = TransformersAdapter.restore


BACKBONE_ADAPTERS = (TransformersBackboneAdapter, Dinov2BackboneAdapter, ClipBackboneAdapter)

__all__ = ["BACKBONE_ADAPTERS", "is_backbone"]
