"""Swin Transformer adapters: V1 (transformers `SwinForImageClassification`, timm `SwinTransformer`) and V2
(transformers `Swinv2ForImageClassification`, timm `SwinTransformerV2`).

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

What Swin V2 adds to V1:
- cosine attention (q and k normalised over the head dim) with a per-head logit scale of shape (heads, 1, 1):
  declared in `head_rows` (heads on the first dim) and sliced to the kept heads. No scale to fold: head-dim
  pruning changes the norms over the kept dims, as removing any channel changes what follows it;
- a continuous position-bias MLP (Linear(2, 512) -> ReLU -> Linear(512, heads)) instead of a bias table: its last
  Linear's output features are heads (`head_rows`), and its MACs shrink with them in the budget. The traced copy
  detaches its output (as BEiT's bias module), so torch-pruning never prunes its hidden width;
- PatchMerging normalises after the reduction (LayerNorm(D) on the output, not LayerNorm(4C) on the input): the
  same customized pruner handles both orders;
- timm's attention computes qkv as `F.linear` on `qkv.weight` with separate q / v biases (and a zero k buffer), and
  reshapes the heads back to the input width. The pruned model runs the pruned form of its attention
  (`modeling/timm_attention.py` `PrunedWindowAttentionV2`: timm's computation at any inner width, bit-identical to
  timm's on the same widths, with qkv called as a module so that counting and reconstruction see it), which
  checkpoints record as the stock class and `load_pruned_model` switches to again; the stock attentions of the
  user's model run in that form only while counted or used as reconstruction's reference. The traced copy folds the
  biases into `qkv.bias` (torch-pruning slices them with the rows, and reconstruction refits them with qkv) and runs
  `_TracedWindowAttentionV2`; they are split back after reconstruction, the key part reset to the zeros timm keeps
  there, which the least-squares refit may have moved (`TimmPrunedFormsAdapter`, as for timm BEiT and EVA-02).
"""

from __future__ import annotations

import types
from typing import Any, Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from ..modeling.timm_attention import PrunedWindowAttentionV2
from .base import AttentionLayout, detached_forward
from .timm_models import TIMM_TABLE_ATTENTION, TimmAdapter, TimmPrunedFormsAdapter
from .transformers_models import TRANSFORMERS_ATTENTION, TransformersAdapter

HF_SWIN_ATTENTION = AttentionLayout(
    projections=TRANSFORMERS_ATTENTION.projections,
    output=TRANSFORMERS_ATTENTION.output,
    num_heads_attr=TRANSFORMERS_ATTENTION.num_heads_attr,
    head_dim_attr=TRANSFORMERS_ATTENTION.head_dim_attr,
    head_params=("relative_position_bias.relative_position_bias_table",),
)

TIMM_SWIN_ATTENTION = TIMM_TABLE_ATTENTION

# transformers' Swin V2 attention: the older query / key / value modules under `self`, the output under `output`.
HF_SWINV2_ATTENTION = AttentionLayout(
    projections=("self.query", "self.key", "self.value"),
    output="output.dense",
    num_heads_attr="self.num_attention_heads",
    head_dim_attr="self.attention_head_size",
    inner_dim_attr="self.all_head_size",
    head_rows=("self.logit_scale", "self.continuous_position_bias_mlp.2"),
)

TIMM_SWINV2_ATTENTION = AttentionLayout(
    projections=("qkv",),
    output="proj",
    num_heads_attr="num_heads",
    head_dim_attr=None,
    head_rows=("logit_scale", "cpb_mlp.2"),
)

SWIN_MODEL_TYPES = {"swin": "SwinForImageClassification"}
SWIN_TIMM_CLASSES = {"timm.models.swin_transformer.SwinTransformer": "swin_*"}
SWINV2_MODEL_TYPES = {"swinv2": "Swinv2ForImageClassification"}
SWINV2_TIMM_CLASSES = {"timm.models.swin_transformer_v2.SwinTransformerV2": "swinv2_*"}


def _norm_first(layer: nn.Module) -> bool:
    """Whether a PatchMerging block normalises its 4C input (V1) rather than its reduced output (V2)."""
    return layer.norm.normalized_shape[0] == layer.reduction.in_features


class PatchMergingPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning pruner for a Swin PatchMerging block: `reduction` = Linear(4C -> D), and `norm` = LayerNorm(4C)
    before it (V1) or LayerNorm(D) after it (V2).

    Both libraries concatenate the four 2x2 neighbours as four blocks of all C channels, so input
    channel c lives at c + k*C for k = 0..3 in `reduction`'s input (and in V1's `norm`).
    """

    TARGET_MODULES = None

    @staticmethod
    def _copies(layer: nn.Module, idxs: Sequence[int]) -> list[int]:
        channels = layer.reduction.in_features // 4
        return [k * channels + int(i) for k in range(4) for i in idxs]

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if not _norm_first(layer):
            tp.prune_layernorm_out_channels(layer.norm, idxs)
        tp.prune_linear_out_channels(layer.reduction, idxs)
        if hasattr(layer, "out_dim"):  # timm keeps the widths as attributes
            layer.out_dim = layer.reduction.out_features
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        copies = self._copies(layer, idxs)
        if _norm_first(layer):
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
        norm_first = _norm_first(layer)
        if is_out:
            return [(layer.reduction, True, idxs)] + ([] if norm_first else [(layer.norm, True, idxs)])
        copies = np.asarray(self._copies(layer, idxs), dtype=np.int64)
        return ([(layer.norm, True, copies)] if norm_first else []) + [(layer.reduction, False, copies)]


def _patch_merging_options(model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    """Register `PatchMergingPruner` for every PatchMerging-shaped block (a 4C -> D `reduction` and a `norm` of its
    input or its output)."""
    blocks = set()
    for m in model.modules():
        reduction, norm = getattr(m, "reduction", None), getattr(m, "norm", None)
        if not (isinstance(reduction, nn.Linear) and isinstance(norm, nn.LayerNorm) and reduction.in_features % 4 == 0):
            continue
        if norm.normalized_shape[0] not in (reduction.in_features, reduction.out_features):
            continue
        if reduction.in_features == reduction.out_features:
            raise ValueError(
                f"{type(m).__name__}: a 4C -> 4C patch merging leaves it unknown whether its norm is applied before "
                "or after the reduction; not supported."
            )
        blocks.add(type(m))
    return {**options, "customized_pruners": {block: PatchMergingPruner() for block in blocks}}


def _merge_by_reshape(self: nn.Module, input_feature, input_dimensions):
    """transformers' `SwinPatchMerging.forward` computed as timm does (a reshape instead of a concat of
    strided slices): the same values in the same order, which torch-pruning can trace."""
    height, width = input_dimensions
    batch, _, channels = input_feature.shape
    x = self.maybe_pad(input_feature.view(batch, height, width, channels), height, width)
    _, height, width, _ = x.shape
    x = x.reshape(batch, height // 2, 2, width // 2, 2, channels).permute(0, 1, 3, 4, 2, 5)
    x = x.reshape(batch, -1, 4 * channels)
    return self.reduction(self.norm(x)) if _norm_first(self) else self.norm(self.reduction(x))


def _hf_patch_mergings(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in ("SwinPatchMerging", "Swinv2PatchMerging")]


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


def _position_bias_mlps(model: nn.Module, path: str) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if name.endswith(path)]


class Swinv2TransformersAdapter(SwinTransformersAdapter):
    """transformers `Swinv2ForImageClassification`: heads (with their logit scales and position-bias MLP outputs),
    head dims, MLPs and stage widths."""

    attention_layouts = (HF_SWINV2_ATTENTION,)
    model_types = SWINV2_MODEL_TYPES
    _position_bias = "continuous_position_bias_mlp"

    def make_traceable(self, model: nn.Module) -> None:
        super().make_traceable(model)
        for mlp in _position_bias_mlps(model, self._position_bias):
            mlp.forward = types.MethodType(detached_forward, mlp)

    def restore(self, model: nn.Module, reference: nn.Module) -> None:
        super().restore(model, reference)
        for mlp in _position_bias_mlps(model, self._position_bias):
            mlp.__dict__.pop("forward", None)


class _TracedWindowAttentionV2(PrunedWindowAttentionV2):
    """What the copy being pruned runs while torch-pruning traces it: the cosine normalisation, the logit scale and the
    position bias are constants to autograd (the same values), so that torch-pruning maps the fused qkv rows through
    the head reshape as it does for Swin V1, and never prunes the position-bias MLP's hidden width."""

    def _cosine_logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = (t * (1 / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)).detach() for t in (q, k))
        return (q @ k.transpose(-2, -1)) * self._logit_scale().detach()

    def _position_bias(self) -> torch.Tensor:
        return super()._position_bias().detach()


class Swinv2TimmAdapter(TimmPrunedFormsAdapter, SwinTimmAdapter):
    """timm `swinv2_*` (`SwinTransformerV2`): heads (with their logit scales and position-bias MLP outputs), head
    dims, MLPs and stage widths."""

    attention_layouts = (TIMM_SWINV2_ATTENTION,)
    timm_classes = SWINV2_TIMM_CLASSES

    def _window_attentions(self, model: nn.Module) -> list[nn.Module]:
        return [a.module for a in self.attentions(model)]

    def make_traceable(self, model: nn.Module) -> None:
        super().make_traceable(model)
        for module in self._window_attentions(model):
            module.__class__ = _TracedWindowAttentionV2

    def restore(self, model: nn.Module, reference: nn.Module) -> None:
        """Calibration and reconstruction run the folded copy in the pruned form (its biases are split back in
        `resized`)."""
        super().restore(model, reference)
        for module in self._window_attentions(model):
            module.__class__ = PrunedWindowAttentionV2
