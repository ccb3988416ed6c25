"""DINOv2 adapter (transformers `Dinov2ForImageClassification`, `Dinov2WithRegistersForImageClassification`).

DINOv2 is a ViT (its attention is laid out like ViT's) plus what this module knows about:
- layer scale (`lambda1`), register tokens, cls token and position embeddings are bare parameters whose last
  dimension is the residual width: torch-pruning prunes them with it, nothing to declare (the MLP, plain or
  SwiGLU, is coupled through the graph the same way);
- the classifier reads concat(cls token, mean of the patch tokens), 2 x hidden wide: torch-pruning switches off
  its concat index mapping downstream of any 3-d bare parameter (a guard meant for the cls-token concat along the
  token axis), which would keep the second half of the classifier's inputs; `adjust_graph` switches it back on
  for the concat feeding the classifier, so residual channel c removes classifier inputs c and hidden + c;
- the mask token (used only for masked-image modelling) is not on the classification path: the traced copy
  runs the embeddings with an all-false mask, so the mask token is traced and pruned with the residual too.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch_pruning import ops

from .transformers_models import TransformersAdapter

DINOV2_MODEL_TYPES = {
    "dinov2": "Dinov2ForImageClassification",
    "dinov2_with_registers": "Dinov2WithRegistersForImageClassification",
}


def _embeddings(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "mask_token", None), nn.Parameter)]


def _forward_with_empty_mask(self: nn.Module, pixel_values: torch.Tensor, bool_masked_pos=None) -> torch.Tensor:
    """The embeddings' forward with an all-false mask: the same values, and the mask token on the traced graph."""
    if bool_masked_pos is None:
        patch_height, patch_width = self.patch_embeddings.patch_size
        height, width = pixel_values.shape[-2] // patch_height, pixel_values.shape[-1] // patch_width
        bool_masked_pos = torch.zeros(
            pixel_values.shape[0], height * width, dtype=torch.bool, device=pixel_values.device
        )
    return type(self).forward(self, pixel_values, bool_masked_pos=bool_masked_pos)


class Dinov2Adapter(TransformersAdapter):
    """transformers DINOv2 classifiers: heads, head dims, MLPs (plain or SwiGLU) and the residual width."""

    model_types = DINOV2_MODEL_TYPES

    def adjust_graph(self, graph: Any, model: nn.Module) -> None:
        heads = set(self.classifiers(model))
        for node in graph.module2node.values():
            if node.type == ops.OPTYPE.CONCAT and any(out.module in heads for out in node.outputs):
                node.enable_index_mapping = True

    def make_traceable(self, model: nn.Module) -> None:
        super().make_traceable(model)
        for embeddings in _embeddings(model):
            embeddings.forward = types.MethodType(_forward_with_empty_mask, embeddings)

    def restore(self, model: nn.Module, reference: nn.Module) -> None:
        super().restore(model, reference)
        for embeddings in _embeddings(model):
            embeddings.__dict__.pop("forward", None)
