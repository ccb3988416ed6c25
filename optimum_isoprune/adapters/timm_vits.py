"""timm BEiT (`beit_*`, `timm.models.beit.Beit`) and EVA-02 (`eva02_*`, `timm.models.eva.Eva`) adapters.

Both are timm ViTs plus what this module knows about (layer scales `gamma_1` / `gamma_2`, the cls token and position
embeddings are bare parameters of the residual width that torch-pruning prunes with it, as DeiT III's):
- the attention reshapes its heads back to the *input* width, and runs its fused qkv projection as
  ``F.linear(x, qkv.weight, cat(q_bias, zero k_bias, v_bias))``, which no module hook sees: the pruned model runs
  the pruned form of its attention (`modeling/timm_attention.py`: the stock forward with the reshape following its
  own heads and qkv called as a module with those biases, the same values), which checkpoints record as the stock
  class and `load_pruned_model` switches to again; the user's model runs it while counted or used as
  reconstruction's reference (`TimmPrunedFormsAdapter`), so qkv is counted and refit as any ViT's. The copy being
  pruned carries the three biases as `qkv.bias` until reconstruction is done, so they lose the rows qkv loses and
  are refit with its weights; they are split back afterwards (the key part reset to the zeros timm keeps there);
- BEiT: the relative position bias table (relative positions x heads) of each block is a per-head parameter, sliced
  to the kept heads as Swin's; a table shared by every block (`use_shared_rel_pos_bias`) ties every block to the same
  heads, so those models keep all their heads (head dims, MLPs and the residual width are still pruned);
- EVA-02: rotary position embeddings rotate each head's dims in pairs (by frequency, the same in every head), so
  rope attentions keep their head dims whole (as do attentions with a per-head q/k norm); heads, MLP neurons and
  the residual width are pruned. The copy is traced without rope (it adds no coupling once head dims stay whole);
- EVA-02's SwiGLU MLP: split `fc1_g` / `fc1_x` (with `norm` between, eva02_base / large) needs no code, the gate and
  value product couples each gate channel to its value channel in torch-pruning's graph; timm's packed `GluMlp`
  (eva02_tiny / small: one fc1, chunked) runs as its two halves in the copy until `finalize` (`timm_glu.py`, as every
  timm model's), for the same coupling.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from timm.models import eva
from torch import nn

from .base import Attention
from .timm_models import TIMM_ATTENTION, TIMM_TABLE_ATTENTION, TimmPrunedFormsAdapter

# BEiT's attention is laid out as Swin's (`TIMM_TABLE_ATTENTION`); a block built without a table has none.
TIMM_BEIT_ATTENTION = TIMM_TABLE_ATTENTION
TIMM_BEIT_NO_TABLE = dataclasses.replace(TIMM_BEIT_ATTENTION, head_params=())
# EVA keeps head_dim; its q / k / v are fused (eva02_*) or separate projections.
TIMM_EVA_ATTENTION = dataclasses.replace(TIMM_ATTENTION, inner_dim_attr=None)
TIMM_EVA_SPLIT_ATTENTION = dataclasses.replace(TIMM_EVA_ATTENTION, projections=("q_proj", "k_proj", "v_proj"))


class BeitTimmAdapter(TimmPrunedFormsAdapter):
    """timm `beit_*`: heads (with their bias tables), head dims, MLPs and the residual width; all heads are kept
    where one bias table is shared by every block."""

    attention_layouts = (TIMM_BEIT_ATTENTION, TIMM_BEIT_NO_TABLE)
    timm_classes = {"timm.models.beit.Beit": "beit_*"}

    @staticmethod
    def _shared_table(model: nn.Module) -> nn.Parameter | None:
        shared = getattr(model, "rel_pos_bias", None)
        return None if shared is None else shared.relative_position_bias_table

    def attentions(self, model: nn.Module) -> list[Attention]:
        found = super().attentions(model)
        for attention in found:
            attention.keep_heads = self._shared_table(model) is not None
        return found

    def graph_options(self, model: nn.Module) -> dict[str, Any]:
        options = super().graph_options(model)
        shared = self._shared_table(model)
        return options if shared is None else {**options, "ignored_params": [*options["ignored_params"], shared]}


class EvaTimmAdapter(TimmPrunedFormsAdapter):
    """timm `eva02_*`: heads, MLPs (SwiGLU) and the residual width; head dims too where no rope or q/k norm ties them."""

    attention_layouts = (TIMM_EVA_ATTENTION, TIMM_EVA_SPLIT_ATTENTION)
    timm_classes = {"timm.models.eva.Eva": "eva02_*"}

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        # Eva also builds timm's other rope ViTs: their AttentionRope modules and depth-dependent (mixed) rope are not
        # handled here.
        blocks = getattr(model, "blocks", ())
        return (
            super().supports(model)
            and not getattr(model, "rope_mixed", False)
            and all(isinstance(block.attn, eva.EvaAttention) for block in blocks)
        )

    def make_traceable(self, model: nn.Module) -> None:
        """Trace without rotary embeddings (rope attentions keep their head dims, so rope adds no coupling, and
        torch-pruning would read its concat of prefix and rotated tokens as a channel concat)."""
        super().make_traceable(model)
        model.rope = None

    def restore(self, model: nn.Module, reference: nn.Module) -> None:
        super().restore(model, reference)
        model.rope = copy.deepcopy(reference.rope)  # buffers only (sin / cos tables), never pruned

    def attentions(self, model: nn.Module) -> list[Attention]:
        found = super().attentions(model)
        rope = getattr(self.model, "rope", None) is not None  # the traced copy runs without it (make_traceable)
        for attention in found:
            attention.keep_head_dims = attention.keep_head_dims or rope  # a q/k norm already keeps them (TimmAdapter)
        return found
