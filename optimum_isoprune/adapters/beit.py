"""BEiT adapter (transformers `BeitForImageClassification`).

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
- the mask token, when the config keeps one, is put on the traced path as DINOv2's is (`Dinov2Adapter`).
"""

from __future__ import annotations

import copy
import types

import torch
from torch import nn

from .base import AttentionLayout
from .dinov2 import Dinov2Adapter
from .transformers_models import TRANSFORMERS_ATTENTION

_TABLE = "relative_position_bias.relative_position_bias_table"

BEIT_ATTENTION = AttentionLayout(
    projections=TRANSFORMERS_ATTENTION.projections,
    output=TRANSFORMERS_ATTENTION.output,
    num_heads_attr=TRANSFORMERS_ATTENTION.num_heads_attr,
    head_dim_attr=TRANSFORMERS_ATTENTION.head_dim_attr,
    head_params=(_TABLE,),
    head_params_level=1,
)

# data2vec-vision is the same network, but transformers still builds it with the older attention modules: not yet.
BEIT_MODEL_TYPES = {"beit": "BeitForImageClassification"}


def unshare_position_bias(model: nn.Module) -> None:
    """Give every layer its own copy of the shared relative position bias table (the same logits)."""
    base = model.base_model
    shared = getattr(base, "shared_position_bias", None)
    if shared is None:
        return
    for layer in base.layers:
        own = layer.relative_position_bias
        if own is None:
            layer.relative_position_bias = copy.deepcopy(shared)
        else:
            with torch.no_grad():
                own.relative_position_bias_table += shared.relative_position_bias_table
    base.shared_position_bias = None
    model.config.use_shared_relative_position_bias = False
    model.config.use_relative_position_bias = True


def _bias_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "relative_position_bias_table", None), nn.Parameter)]


def _detached_bias(self: nn.Module, *args, **kwargs) -> torch.Tensor:
    """The bias module's forward off torch-pruning's traced graph (the same values)."""
    return type(self).forward(self, *args, **kwargs).detach()


class BeitAdapter(Dinov2Adapter):
    """transformers BEiT classifiers: heads (with their bias tables), head dims, MLPs and the
    residual width."""

    attention_layouts = (BEIT_ATTENTION, TRANSFORMERS_ATTENTION)  # the second: layers without a bias table
    model_types = BEIT_MODEL_TYPES

    def make_traceable(self, model: nn.Module) -> None:
        unshare_position_bias(model)
        super().make_traceable(model)
        for bias in _bias_modules(model):
            bias.forward = types.MethodType(_detached_bias, bias)

    def restore(self, model: nn.Module, reference: nn.Module) -> None:
        super().restore(model, reference)
        for bias in _bias_modules(model):
            bias.__dict__.pop("forward", None)
