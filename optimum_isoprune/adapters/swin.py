"""Swin Transformer adapters (transformers `SwinForImageClassification`, timm `SwinTransformer`).

What Swin adds to a ViT, and where that knowledge lives here:
- windowed attention: each query sees one window's tokens; `CostModel` measures that from the
  query projection's input, nothing to declare;
- a relative position bias table (relative positions x heads) per attention: declared as a
  per-head parameter of the layout, kept out of torch-pruning's graph and sliced to the kept heads;
- PatchMerging (four shifted copies of C channels concatenated, then LayerNorm(4C) + Linear(4C -> 2C)):
  torch-pruning's index mapping gets the 4-way concat of strided slices wrong, so the whole block gets
  a customized pruner that maps residual channel c to c, C + c, 2C + c and 3C + c (and transformers'
  block is traced through timm's equivalent reshape, which that mapping survives). Residual widths
  of every stage can therefore be pruned too.
"""

from __future__ import annotations

import types
from typing import Any, Sequence

import numpy as np
import torch_pruning as tp
from torch import nn

from .base import AttentionLayout
from .timm_models import TimmAdapter
from .transformers_models import TRANSFORMERS_ATTENTION, TransformersAdapter

HF_SWIN_ATTENTION = AttentionLayout(
    projections=TRANSFORMERS_ATTENTION.projections,
    output=TRANSFORMERS_ATTENTION.output,
    num_heads_attr=TRANSFORMERS_ATTENTION.num_heads_attr,
    head_dim_attr=TRANSFORMERS_ATTENTION.head_dim_attr,
    head_params=("relative_position_bias.relative_position_bias_table",),
)

# timm's WindowAttention infers the head dim from the qkv width and keeps no attn_dim attribute.
TIMM_SWIN_ATTENTION = AttentionLayout(
    projections=("qkv",),
    output="proj",
    num_heads_attr="num_heads",
    head_dim_attr=None,
    head_params=("relative_position_bias_table",),
    implicit_scale_attr="scale",
)

SWIN_MODEL_TYPES = {"swin": "SwinForImageClassification"}
SWIN_TIMM_CLASSES = {"timm.models.swin_transformer.SwinTransformer": "swin_*"}


class PatchMergingPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning pruner for a Swin PatchMerging block (`norm` = LayerNorm(4C), `reduction` = Linear(4C -> D)).

    Both libraries concatenate the four 2x2 neighbours as four blocks of all C channels, so input
    channel c lives at c + k*C for k = 0..3 in `norm` and in `reduction`'s input.
    """

    TARGET_MODULES = None

    @staticmethod
    def _copies(layer: nn.Module, idxs: Sequence[int]) -> list[int]:
        channels = layer.reduction.in_features // 4
        return [k * channels + int(i) for k in range(4) for i in idxs]

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        tp.prune_linear_out_channels(layer.reduction, idxs)
        if hasattr(layer, "out_dim"):  # timm keeps the widths as attributes
            layer.out_dim = layer.reduction.out_features
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        copies = self._copies(layer, idxs)
        tp.prune_layernorm_out_channels(layer.norm, copies)
        tp.prune_linear_in_channels(layer.reduction, copies)
        if hasattr(layer, "dim"):
            layer.dim = layer.reduction.in_features // 4
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.reduction.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.reduction.in_features // 4

    def layer_indices(
        self, layer: nn.Module, idxs: np.ndarray, is_out: bool
    ) -> list[tuple[nn.Module, bool, np.ndarray]]:
        """The indices each of the block's layers loses when the block loses `idxs` (copy-major order)."""
        if is_out:
            return [(layer.reduction, True, idxs)]
        copies = np.asarray(self._copies(layer, idxs), dtype=np.int64)
        return [(layer.norm, True, copies), (layer.reduction, False, copies)]


def _patch_merging_options(model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    """Register `PatchMergingPruner` for every PatchMerging-shaped block (a `norm` and a 4C -> D `reduction`)."""
    blocks = {
        type(m)
        for m in model.modules()
        if isinstance(getattr(m, "reduction", None), nn.Linear)
        and isinstance(getattr(m, "norm", None), nn.LayerNorm)
        and m.norm.normalized_shape[0] == m.reduction.in_features
        and m.reduction.in_features % 4 == 0
    }
    return {**options, "customized_pruners": {block: PatchMergingPruner() for block in blocks}}


def _merge_by_reshape(self: nn.Module, input_feature, input_dimensions):
    """transformers' `SwinPatchMerging.forward` computed as timm does (a reshape instead of a concat of
    strided slices): the same values in the same order, which torch-pruning can trace."""
    height, width = input_dimensions
    batch, _, channels = input_feature.shape
    x = self.maybe_pad(input_feature.view(batch, height, width, channels), height, width)
    _, height, width, _ = x.shape
    x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).permute(0, 1, 3, 4, 2, 5)
    return self.reduction(self.norm(x.reshape(batch, -1, 4 * channels)))


def _hf_patch_mergings(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "SwinPatchMerging"]


class SwinTransformersAdapter(TransformersAdapter):
    """transformers `SwinForImageClassification`: heads (with their bias table), head dims, MLPs and stage widths."""

    attention_layouts = (HF_SWIN_ATTENTION,)
    model_types = SWIN_MODEL_TYPES

    def graph_options(self, model: nn.Module) -> dict[str, Any]:
        return _patch_merging_options(model, super().graph_options(model))

    def make_traceable(self, model: nn.Module) -> None:
        super().make_traceable(model)
        for block in _hf_patch_mergings(model):
            block.forward = types.MethodType(_merge_by_reshape, block)

    def restore(self, model: nn.Module, reference: nn.Module) -> None:
        super().restore(model, reference)
        for block in _hf_patch_mergings(model):
            block.__dict__.pop("forward", None)


class SwinTimmAdapter(TimmAdapter):
    """timm `swin_*` (`SwinTransformer`): heads (with their bias table), head dims, MLPs and stage widths."""

    attention_layouts = (TIMM_SWIN_ATTENTION,)
    timm_classes = SWIN_TIMM_CLASSES

    def graph_options(self, model: nn.Module) -> dict[str, Any]:
        return _patch_merging_options(model, super().graph_options(model))
