"""Adapters for timm models (vit / deit / deit3 incl. distilled, convnext, resnet, efficientnet, mobilenetv3, regnety).

Squeeze-and-excitation (efficientnet, mobilenetv3, regnety), depthwise convolutions and layer scale need no
code here: torch-pruning couples them through the graph. Grouped convolutions (regnety) and GroupNorm are ranked by
offset across their groups in `isomorphic.py`, so every group keeps the same width. What this module adds:
- a q/k norm (`qk_norm=True`: one norm over the head dim, shared by every head) and efficient channel attention's
  Conv1d along the channel axis (`ecaresnet*`) are kept out of the traced graph, which would map them to the full
  width; a q/k-normed attention keeps its head dims whole (heads are still pruned);
- a packed SwiGLU MLP (`mlp_layer=SwiGLUPacked`, vit_giant_patch14_dinov2, EVA-02 tiny / small) runs as its two
  halves while pruned (`timm_glu.py`); RmsNorm's `normalized_shape` and BlurPool2d's per-channel filter
  (`resnetblur*`, a buffer) follow the pruned width in `finalize`;
- `variant_gap` refuses the options no adapter maps yet (attention-pooling head, other ViT blocks, differential
  attention, selective-kernel / split attention, MixedConv2d), saying what to build instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..guards import hooks_removed
from ..modeling.timm_attention import fold_qkv_biases, pruned_forms, split_qkv_biases, use_pruned_forms
from .base import Attention, AttentionLayout, ModelAdapter, sync_norm_shapes
from .timm_glu import pack_glu, packed_glus, split_packed_glu

TIMM_ATTENTION = AttentionLayout(
    projections=("qkv",),
    output="proj",
    num_heads_attr="num_heads",
    head_dim_attr="head_dim",
    inner_dim_attr="attn_dim",
    implicit_scale_attr="scale",
)
# timm attentions that infer the head dim from the qkv width (no head_dim / attn_dim attributes) and keep a relative
# position bias table (relative positions x heads) of their own: Swin's WindowAttention, BEiT's Attention.
TIMM_TABLE_ATTENTION = dataclasses.replace(
    TIMM_ATTENTION, head_dim_attr=None, inner_dim_attr=None, head_params=("relative_position_bias_table",)
)

# timm model classes (by module and name) that the pruner handles.
SUPPORTED_TIMM_CLASSES = {
    "timm.models.vision_transformer.VisionTransformer": "vit_*, deit_*, deit3_*",
    "timm.models.deit.VisionTransformerDistilled": "deit_*_distilled_*",
    "timm.models.convnext.ConvNeXt": "convnext_*",
    "timm.models.resnet.ResNet": "resnet*",
    "timm.models.efficientnet.EfficientNet": "efficientnet_*",
    "timm.models.mobilenetv3.MobileNetV3": "mobilenetv3_*",
    "timm.models.regnet.RegNet": "regnety_*",
}


# timm VisionTransformer blocks (block_fn) whose attention and MLP layers the pruner maps.
_VIT_BLOCKS = {"Block", "ResPostBlock", "ParallelThingsBlock"}


# timm attentions over parallel conv branches (selective kernel, ResNeSt's split attention).
_SPLIT_ATTENTIONS = {"SelectiveKernel", "SplitAttn"}


def _qualname(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__name__}"


def _feature_layer(model: nn.Module) -> nn.Module:
    """The layer whose output channels are a headless timm model's features: a ViT's patch embedding (its residual
    width is the feature width), else the last Conv2d / Linear (a CNN's last block or `conv_head`)."""
    patch_embed = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(patch_embed, nn.Conv2d):
        return patch_embed
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]


def channel_convs(model: nn.Module) -> list[nn.Module]:
    """1-channel Conv1d layers that slide along the channel axis (efficient channel attention, `ecaresnet*`): they
    hold no per-channel weights, so they stay out of the traced graph, which would read them as 1-channel layers."""
    return [m for m in model.modules() if isinstance(m, nn.Conv1d) and m.in_channels == m.out_channels == 1]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _blur_pools(model: nn.Module) -> list[nn.Module]:
    """timm's BlurPool2d layers (`resnetblur*`, aa_layer='blurpc'): a fixed binomial filter per channel."""
    return [m for m in model.modules() if type(m).__name__ == "BlurPool2d" and hasattr(m, "filt")]


def _set_blur_width(blur: nn.Module, channels: int | None) -> None:
    """Give a BlurPool2d `channels` copies of its fixed filter, or one it expands to any width (`None`, timm's form
    for an unknown width): the same values either way."""
    blur.channels = channels
    blur.filt = torch.empty((channels or 1, *blur.filt.shape[1:]), dtype=blur.filt.dtype, device=blur.filt.device)
    blur._init_buffers()


def _input_widths(model: nn.Module, modules: list[nn.Module], example: torch.Tensor) -> list[int]:
    """The channel count each of `modules` receives when `model` (in eval mode) runs on `example`."""
    widths: dict[nn.Module, int] = {}

    def record(module: nn.Module, args: tuple) -> None:
        widths.setdefault(module, args[0].shape[1])

    hooks = [m.register_forward_pre_hook(record) for m in modules]
    training = model.training
    try:
        with hooks_removed(hooks), torch.no_grad():
            model.eval()(example)
    finally:
        model.train(training)
    return [widths[m] for m in modules]


def qk_norms(attention: nn.Module) -> list[nn.Module]:
    """A timm attention's q / k norms over the head dim (`qk_norm=True`), where it has them."""
    norms = (getattr(attention, name, None) for name in ("q_norm", "k_norm"))
    return [n for n in norms if isinstance(n, nn.Module) and not isinstance(n, nn.Identity)]


class TimmAdapter(ModelAdapter):
    """timm models whose class is in `SUPPORTED_TIMM_CLASSES`."""

    attention_layouts = (TIMM_ATTENTION,)
    timm_classes: dict[str, str] = SUPPORTED_TIMM_CLASSES

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return _qualname(model) in cls.timm_classes

    @classmethod
    def describe_supported(cls) -> str:
        return "timm: " + ", ".join(cls.timm_classes.values())

    @classmethod
    def variant_gap(cls, model: nn.Module) -> str | None:
        """timm options of a supported class whose layers no adapter maps yet: an attention-pooling head, blocks
        that fuse or split their projections differently (`block_fn`), differential attention."""
        if isinstance(getattr(model, "attn_pool", None), nn.Module):
            return (
                f"has an attention-pooling head (timm global_pool={getattr(model, 'global_pool', 'map')!r}), which is "
                "not pruned yet (its attention needs a layout of its own). Build the model with global_pool='avg', "
                "fc_norm=False (its final norm stays where it was), load the trained weights with "
                "load_state_dict(state_dict, strict=False) (only attn_pool.* is left out), and finetune the head."
            )
        blocks = {type(b).__name__ for b in getattr(model, "blocks", ())}
        if _qualname(model) == "timm.models.vision_transformer.VisionTransformer" and blocks - _VIT_BLOCKS:
            return (
                f"is built from {', '.join(sorted(blocks - _VIT_BLOCKS))} blocks (block_fn), whose fused attention "
                f"and MLP projections the pruner does not map yet; supported: {', '.join(sorted(_VIT_BLOCKS))}."
            )
        split = sorted({type(m).__name__ for m in model.modules()} & _SPLIT_ATTENTIONS)
        if split:
            return (
                f"uses {', '.join(split)} (skresnet*, resnest*): one conv's outputs hold every branch's channels "
                "(branches x channels), which the pruner does not map yet; prune a resnet*, seresnet* or "
                "ecaresnet* instead."
            )
        if any(type(m).__name__ == "MixedConv2d" for m in model.modules()):
            return (
                "uses MixedConv2d (mixnet_*): its channels are split into chunks of fixed widths, one kernel size "
                "each, which the pruner does not resize yet; prune an efficientnet_* or mobilenetv3_* instead."
            )
        if any(type(m).__name__ == "DiffAttention" for m in model.modules()):
            return (
                "uses differential attention (attn_layer='diff'), whose paired heads and per-head-dim lambdas the "
                "pruner does not map yet; build the model with the default attention (attn_layer='attn')."
            )
        return super().variant_gap(model)

    def _input_size(self) -> tuple[int, int, int]:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        return tuple(cfg.get("input_size", (3, 224, 224)))

    def image_size(self) -> int:
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is not None and getattr(patch_embed, "img_size", None):
            return int(patch_embed.img_size[0])
        return int(self._input_size()[-1])

    def num_channels(self) -> int:
        for module in self.model.modules():
            if isinstance(module, nn.Conv2d):
                return module.in_channels
        return int(self._input_size()[0])

    @property
    def objective(self) -> str:  # type: ignore[override]
        """A timm model created with `num_classes=0` has no head: it is pruned on its features (objectives.py)."""
        return "features" if getattr(self.model, "num_classes", None) == 0 else "logits"

    def features(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """What a headless timm model returns: its pooled (and, where the model has one, normalised) features."""
        return model(pixel_values)

    def classifiers(self, model: nn.Module) -> list[nn.Module]:
        heads = model.get_classifier()  # a tuple (head, head_dist) for distilled models
        heads = list(heads) if isinstance(heads, tuple) else [heads]
        found = [m for head in heads for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if getattr(model, "num_classes", None) == 0:
            # A headless model keeps its feature width for the head attached later, as the transformers backbones do
            # (adapters/backbones.py): whatever is coupled to the layer producing the features stays whole.
            found.append(_feature_layer(model))
        return found

    def attentions(self, model: nn.Module) -> list[Attention]:
        found = super().attentions(model)
        for attention in found:
            attention.keep_head_dims = attention.keep_head_dims or bool(qk_norms(attention.module))
        return found

    def graph_options(self, model: nn.Module) -> dict[str, Any]:
        """q / k norms stay out of the graph (their channels are one head's dims, which their attention keeps), and
        so do convolutions along the channel axis."""
        options = super().graph_options(model)
        ignored = [n for a in self.attentions(model) for n in qk_norms(a.module)] + channel_convs(model)
        return {**options, "ignored_layers": [*options.get("ignored_layers", []), *ignored]} if ignored else options

    def restore(self, model: nn.Module, reference: nn.Module) -> None:
        for pruned, original in zip(self.attentions(model), self.attentions(reference)):
            if hasattr(original.module, "fused_attn"):
                pruned.module.fused_attn = original.module.fused_attn

    def make_traceable(self, model: nn.Module) -> None:
        for attention in self.attentions(model):
            if hasattr(attention.module, "fused_attn"):  # Swin V2's attention has none
                attention.module.fused_attn = False
        for mlp in packed_glus(model):
            split_packed_glu(mlp)
        for blur in _blur_pools(model):
            _set_blur_width(blur, None)

    def finalize(self, model: nn.Module) -> None:
        sync_norm_shapes(model)  # norm_layer="rmsnorm"
        for mlp in packed_glus(model):
            pack_glu(mlp)
        blurs = _blur_pools(model)
        if blurs:  # back to timm's fixed-width form, at the widths they are now given (saved as stock modules)
            example = torch.zeros(1, self.num_channels(), self.image_size(), self.image_size(), device=_device(model))
            for blur, width in zip(blurs, _input_widths(model, blurs, example)):
                _set_blur_width(blur, width)

    def base_model_name(self) -> str | None:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        return cfg.get("hf_hub_id") or cfg.get("architecture")


class TimmPrunedFormsAdapter(TimmAdapter):
    """timm models whose attentions have a pruned form (`modeling/timm_attention.py`: BEiT, EVA-02, Swin V2), which
    calls their fused qkv as a module with its separate q / v biases (timm's values, seen by module hooks).

    The copy being pruned runs the pruned forms for good, its q / k / v biases carried as `qkv.bias` from tracing
    until reconstruction is done (torch-pruning slices them with qkv's rows, reconstruction refits them with its
    weights); the user's stock model runs them only for the duration of `forward` (counted, or used as
    reconstruction's reference), and is of its stock classes again afterwards."""

    def forward(self, model: nn.Module, pixel_values: torch.Tensor) -> Any:
        with pruned_forms(model):
            return super().forward(model, pixel_values)

    def make_traceable(self, model: nn.Module) -> None:
        use_pruned_forms(model)
        super().make_traceable(model)
        for attention in self.attentions(model):
            fold_qkv_biases(attention.module)

    def resized(self, model: nn.Module) -> None:
        super().resized(model)
        for attention in self.attentions(model):
            split_qkv_biases(attention.module)
