"""Pruned forms of timm attention modules that reshape their heads back to the *input* width.

timm's BEiT (`timm.models.beit.Attention`), EVA (`timm.models.eva.EvaAttention`) and Swin V2
(`timm.models.swin_transformer_v2.WindowAttention`) end with ``x.transpose(1, 2).reshape(B, N, C)``, C being the width
of the attention's input (the residual width). Once heads or head dims are pruned independently of the residual
width, num_heads * head_dim no longer equals C. The pruned forms below are subclasses whose forward is the stock one
with that reshape taking the heads' own width (``reshape(B, N, -1)``); everything else, parameters and attributes
included, is the stock module's, so a pruned model is still described by its stock layout plus a shape manifest
(`modeling/convert.py`), and the same values come out bit for bit. The stock forwards also run the fused qkv with
its separate q / v biases as ``F.linear`` on `qkv.weight`, which no module hook sees; the pruned forms call `qkv` as a
module with those biases (`_qkv`: the same values), so MAC counting and reconstruction see it as any other layer.
`use_pruned_forms` switches a model's modules to them (the pruner on the copy it prunes, `rebuild_timm_model` when
loading a checkpoint): code from this package, never from the checkpoint; `pruned_forms` does so for the duration (the
user's model while it is counted or used as reconstruction's reference). A pruned model is a plain module tree: it
deep-copies and pickles as the stock one does. While the pruner's copy is traced, cut and refit, `fold_qkv_biases`
carries the separate q / k / v biases as `qkv.bias` (torch-pruning slices them with qkv's rows, reconstruction refits
them with its weights); `split_qkv_biases` restores timm's layout afterwards.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat, maybe_add_mask, resolve_self_attn_mask
from timm.models import beit, eva, swin_transformer_v2
from torch import nn
from torch.func import functional_call


def _qkv(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's fused qkv projection with its separate q / (zero) k / v biases, the values the stock forwards compute
    (``F.linear(x, qkv.weight, cat(q_bias, k_bias, v_bias))``), but with `qkv` called as a module (the biases passed
    in), so that hooks on it run: MAC counting and reconstruction see it as any other layer."""
    if module.q_bias is None:
        return module.qkv(x)
    qkv_bias = torch.cat((module.q_bias, module.k_bias, module.v_bias))
    if module.qkv_bias_separate:
        qkv = module.qkv(x)
        qkv += qkv_bias
        return qkv
    return functional_call(module.qkv, {"weight": module.qkv.weight, "bias": qkv_bias}, (x,))


def fold_qkv_biases(module: nn.Module) -> None:
    """Carry a fused qkv's separate q / k / v biases as `qkv.bias` (`_qkv` then calls `qkv(x)`: the same values),
    where torch-pruning slices them with qkv's rows."""
    if getattr(module, "qkv", None) is None or module.q_bias is None:
        return
    bias = torch.cat((module.q_bias, module.k_bias, module.v_bias)).detach()
    module.qkv.bias = nn.Parameter(bias, requires_grad=module.q_bias.requires_grad)
    module.q_bias = module.v_bias = module.k_bias = None


def split_qkv_biases(module: nn.Module) -> None:
    """Undo `fold_qkv_biases` on the pruned rows: q and v biases are parameters again, k's the zero buffer timm keeps
    (whatever a refit left in its rows)."""
    qkv = getattr(module, "qkv", None)
    if qkv is None or qkv.bias is None:
        return
    q, _, v = qkv.bias.detach().chunk(3)
    module.q_bias = nn.Parameter(q.clone(), requires_grad=qkv.bias.requires_grad)
    module.v_bias = nn.Parameter(v.clone(), requires_grad=qkv.bias.requires_grad)
    module.k_bias = torch.zeros_like(q)  # still registered as a non-persistent buffer, never saved
    qkv.bias = None


class PrunedBeitAttention(beit.Attention):
    """`timm.models.beit.Attention` whose output reshape follows its own heads, not the residual width."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = _qkv(self, x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            rel_pos_bias = None
            if self.relative_position_bias_table is not None:
                rel_pos_bias = self._get_rel_pos_bias()
                if shared_rel_pos_bias is not None:
                    rel_pos_bias = rel_pos_bias + shared_rel_pos_bias
            elif shared_rel_pos_bias is not None:
                rel_pos_bias = shared_rel_pos_bias
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=rel_pos_bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            if self.relative_position_bias_table is not None:
                attn = attn + self._get_rel_pos_bias()
            if shared_rel_pos_bias is not None:
                attn = attn + shared_rel_pos_bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))


class PrunedEvaAttention(eva.EvaAttention):
    """`timm.models.eva.EvaAttention` whose output reshape follows its own heads, not the residual width."""

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        if self.qkv is not None:
            q, k, v = _qkv(self, x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (
                p(x).reshape(B, N, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
            )
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal,
            )
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal=is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class PrunedWindowAttentionV2(swin_transformer_v2.WindowAttention):
    """`timm.models.swin_transformer_v2.WindowAttention` whose output reshape follows its own heads, not the input
    width."""

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, _ = x.shape
        qkv = _qkv(self, x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self._cosine_logits(q, k) + self._position_bias().unsqueeze(0)
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))

    def _logit_scale(self) -> torch.Tensor:
        """Each head's logit scale, (heads, 1, 1)."""
        return torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()

    def _cosine_logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of queries and keys (over the head dim) times each head's logit scale."""
        return (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self._logit_scale()

    def _position_bias(self) -> torch.Tensor:
        """The continuous position bias, (heads, tokens, tokens): 16 * sigmoid of the position-bias MLP's output."""
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        area = self.window_size[0] * self.window_size[1]
        bias = table[self.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1).contiguous()
        return 16 * torch.sigmoid(bias)


# pruned form -> the stock class it stands for (same parameters, buffers and attributes)
PRUNED_FORMS: dict[type[nn.Module], type[nn.Module]] = {
    PrunedBeitAttention: beit.Attention,
    PrunedEvaAttention: eva.EvaAttention,
    PrunedWindowAttentionV2: swin_transformer_v2.WindowAttention,
}
_FORM_OF = {stock: form for form, stock in PRUNED_FORMS.items()}


def _switch_to_pruned_forms(model: nn.Module) -> list[nn.Module]:
    """Switch every module of a stock class listed in `PRUNED_FORMS` to its pruned form, in place; returns them."""
    switched = [module for module in model.modules() if type(module) in _FORM_OF]
    for module in switched:
        module.__class__ = _FORM_OF[type(module)]
    return switched


def use_pruned_forms(model: nn.Module) -> nn.Module:
    """Switch every module of a stock class listed in `PRUNED_FORMS` to its pruned form, in place."""
    _switch_to_pruned_forms(model)
    return model


@contextmanager
def pruned_forms(model: nn.Module) -> Iterator[nn.Module]:
    """`use_pruned_forms` for the duration: the modules it switched are of their stock class again afterwards."""
    switched = _switch_to_pruned_forms(model)
    try:
        yield model
    finally:
        for module in switched:
            module.__class__ = PRUNED_FORMS[type(module)]


def stands_for(module: nn.Module, stock: type[nn.Module]) -> bool:
    """`module` is a `stock` module, or the pruned form of one."""
    return type(module) is stock or PRUNED_FORMS.get(type(module)) is stock
