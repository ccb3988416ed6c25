"""BEiT adapter (transformers `BeitForImageClassification`, `Data2VecVisionForImageClassification`).

BEiT is a ViT (its attention is laid out like ViT's; the key projection has
no bias, the query and value projections have one) plus what this module knows about:
- a relative position bias table (relative positions x heads) per layer, kept on the layer beside the attention:
  declared as a per-head parameter one module level above the attention (`head_params_level=1`), kept out of
  torch-pruning's graph and sliced to the kept heads, as Swin's is. The bias it adds to the attention scores
  depends on the table alone, but is built with a concat along the relative positions that torch-pruning would read
  as channels: the traced copy detaches it, so the graph never sees that computation (restored afterwards);
- a bias table shared by every layer (`use_shared_relative_position_bias`) would tie every layer to the same heads:
  the copy being pruned gives each layer its own copy of it (added to the layer's own table, if any; the bias is
  linear in the table) and says so in its config, so each layer keeps its own heads. The pruned model holds one
  table per layer (a few thousand parameters each) instead of one;
- layer scale (`lambda_1`, `lambda_2`), the cls token and the optional absolute position embeddings are bare
  parameters whose last dimension is the residual width: torch-pruning prunes them with it; the mean-pooling head
  (mean of the patch tokens, then a LayerNorm) is traced like any other layer;
- the mask token, when the config keeps one, is put on the traced path as DINOv2's is (`Dinov2Adapter`);
- data2vec-vision is the same network built with transformers' older attention modules (`DATA2VEC_VISION_ATTENTION`:
  dotted paths from the module holding both the self-attention and its output projection); its scale is recomputed
  from the head size, so pruned head dims fold the original scale into the queries; its SDPA self-attention class
  (chosen at construction) runs its eager parent's forward in the traced copy.
"""

from __future__ import annotations

import copy
import dataclasses
import types

import torch
from torch import nn

from .base import AttentionLayout, detached_forward
from .dinov2 import Dinov2Adapter
from .transformers_models import TRANSFORMERS_ATTENTION, model_type

_TABLE = "relative_position_bias.relative_position_bias_table"

BEIT_ATTENTION = AttentionLayout(
    projections=TRANSFORMERS_ATTENTION.projections,
    output=TRANSFORMERS_ATTENTION.output,
    num_heads_attr=TRANSFORMERS_ATTENTION.num_heads_attr,
    head_dim_attr=TRANSFORMERS_ATTENTION.head_dim_attr,
    head_params=(_TABLE,),
    head_params_level=1,
)

# data2vec-vision is the same network built by transformers with its older attention modules: query / key / value,
# the head size and the per-layer bias table on a self-attention module, the output projection on a sibling.
DATA2VEC_VISION_ATTENTION = AttentionLayout(
    projections=("attention.query", "attention.key", "attention.value"),
    output="output.dense",
    num_heads_attr="attention.num_attention_heads",
    head_dim_attr="attention.attention_head_size",
    inner_dim_attr="attention.all_head_size",
    head_params=(f"attention.{_TABLE}",),
    scale_from_head_dim=True,  # it divides the scores by sqrt(attention_head_size)
)
DATA2VEC_VISION_NO_TABLE = dataclasses.replace(DATA2VEC_VISION_ATTENTION, head_params=())

BEIT_MODEL_TYPES = {
    "beit": "BeitForImageClassification",
    "data2vec-vision": "Data2VecVisionForImageClassification",
}
# model_type -> (the layers, the shared bias module on the base model, the per-layer bias module on each layer)
_BIAS_PLACES = {
    "beit": ("layers", "shared_position_bias", "relative_position_bias"),
    "data2vec-vision": (
        "encoder.layer",
        "encoder.relative_position_bias",
        "attention.attention.relative_position_bias",
    ),
}


def _place(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner, _, attribute = path.rpartition(".")
    return (root.get_submodule(owner) if owner else root), attribute


def unshare_position_bias(model: nn.Module) -> None:
    """Give every layer its own copy of the shared relative position bias table (the same logits)."""
    base = model.base_model
    layers_path, shared_path, own_path = _BIAS_PLACES[model_type(model)]
    shared_owner, shared_name = _place(base, shared_path)
    shared = getattr(shared_owner, shared_name, None)
    if not model.config.use_shared_relative_position_bias or shared is None:
        return
    for layer in base.get_submodule(layers_path):
        owner, name = _place(layer, own_path)
        own = getattr(owner, name, None)
        if own is None:
            setattr(owner, name, copy.deepcopy(shared))
        else:
            with torch.no_grad():
                own.relative_position_bias_table += shared.relative_position_bias_table
        if hasattr(owner, "has_relative_position_bias"):  # data2vec-vision's switches
            owner.has_relative_position_bias = True
    setattr(shared_owner, shared_name, None)
    if hasattr(shared_owner, "has_relative_position_bias"):
        shared_owner.has_relative_position_bias = False
    model.config.use_shared_relative_position_bias = False
    model.config.use_relative_position_bias = True


def _eager_attention_forward(self: nn.Module, *args, **kwargs):
    """data2vec-vision's SDPA self-attention run by its eager parent class (every matmul visible to autograd)."""
    eager = next(c for c in type(self).__mro__[1:] if "forward" in vars(c))
    return eager.forward(self, *args, **kwargs)


def _sdpa_attentions(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == "Data2VecVisionSdpaSelfAttention"]


def _bias_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "relative_position_bias_table", None), nn.Parameter)]


class BeitAdapter(Dinov2Adapter):
    """transformers BEiT and data2vec-vision classifiers: heads (with their bias tables), head dims, MLPs and the
    residual width."""

    # BEiT's, then data2vec-vision's; each without a per-layer bias table second
    attention_layouts = (BEIT_ATTENTION, TRANSFORMERS_ATTENTION, DATA2VEC_VISION_ATTENTION, DATA2VEC_VISION_NO_TABLE)
    model_types = BEIT_MODEL_TYPES

    def make_traceable(self, model: nn.Module) -> None:
        unshare_position_bias(model)
        super().make_traceable(model)
        for bias in _bias_modules(model):
            bias.forward = types.MethodType(detached_forward, bias)
        for attention in _sdpa_attentions(model):
            attention.forward = types.MethodType(_eager_attention_forward, attention)

    def restore(self, model: nn.Module, reference: nn.Module) -> None:
        super().restore(model, reference)
        for module in _bias_modules(model) + _sdpa_attentions(model):
            module.__dict__.pop("forward", None)
