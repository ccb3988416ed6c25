"""The one table of pruned families: every pruned model class (its config class is `config_class`) with how
to summarise its widths for people reading ``config.json``.

Everything that lists families is built from `FAMILIES`: `to_pruned_model`'s lookup (`convert.py`), the exports
and Auto registrations of `optimum_isoprune.modeling`, and the checkpoint types `load_pruned_model` accepts.
Adding a family: its config class (`configuration_pruned.py`), its model class (`modeling_pruned.py`), one row
here, and the model type in its adapter (a test fails while one of them is missing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from ..layers import channels
from .configuration_pruned import PrunedConfigMixin
from .modeling_pruned import (
    PrunedBeitForImageClassification,
    PrunedCLIPForImageClassification,
    PrunedCLIPVisionModel,
    PrunedConvNextForImageClassification,
    PrunedConvNextV2ForImageClassification,
    PrunedData2VecVisionForImageClassification,
    PrunedDeiTForImageClassification,
    PrunedDeiTForImageClassificationWithTeacher,
    PrunedDinov2ForImageClassification,
    PrunedDinov2Model,
    PrunedDinov2WithRegistersForImageClassification,
    PrunedEfficientNetForImageClassification,
    PrunedLevitForImageClassification,
    PrunedLevitForImageClassificationWithTeacher,
    PrunedMobileNetV2ForImageClassification,
    PrunedModelMixin,
    PrunedRegNetForImageClassification,
    PrunedResNetForImageClassification,
    PrunedSiglipForImageClassification,
    PrunedSwinForImageClassification,
    PrunedSwinv2ForImageClassification,
    PrunedTimmWrapperForImageClassification,
    PrunedViTForImageClassification,
    PrunedViTModel,
)

# Readable per-family summaries (never used to build a model)


def _modules_with(model: nn.Module, *attributes: str) -> list[nn.Module]:
    return [m for m in model.modules() if all(hasattr(m, a) for a in attributes)]


def _vit_widths(model: nn.Module) -> dict[str, Any]:
    attentions = _modules_with(model, "q_proj", "num_attention_heads")
    return {
        "pruned_hidden_size": int(_modules_with(model, "cls_token")[0].cls_token.shape[-1]),
        "layer_num_heads": [int(a.num_attention_heads) for a in attentions],
        "layer_head_dims": [int(a.head_dim) for a in attentions],
        "layer_intermediate_sizes": [channels(m.fc1) for m in _modules_with(model, "fc1", "fc2")],
    }


def _dinov2_widths(model: nn.Module) -> dict[str, Any]:
    """ViT's summary; the MLP width is fc1's, or up_proj's for a SwiGLU MLP."""
    widths = _vit_widths(model)
    mlps = [layer.mlp for layer in model.base_model.encoder.layer]  # a backbone is its own base model
    widths["layer_intermediate_sizes"] = [channels(getattr(mlp, "fc1", None) or mlp.up_proj) for mlp in mlps]
    return widths


def _data2vec_vision_widths(model: nn.Module) -> dict[str, Any]:
    """ViT's summary from data2vec-vision's older module names."""
    layers = model.base_model.encoder.layer
    return {
        "pruned_hidden_size": int(model.base_model.embeddings.cls_token.shape[-1]),
        "layer_num_heads": [int(layer.attention.attention.num_attention_heads) for layer in layers],
        "layer_head_dims": [int(layer.attention.attention.attention_head_size) for layer in layers],
        "layer_intermediate_sizes": [channels(layer.intermediate.dense) for layer in layers],
    }


def _clip_widths(model: nn.Module) -> dict[str, Any]:
    """ViT's summary for the vision tower of CLIP / SigLIP: its patch embedding, attentions and MLPs."""
    tower = getattr(model, "vision_model", model)  # CLIPVisionModel is the tower itself
    return {
        "pruned_hidden_size": int(tower.embeddings.patch_embedding.out_channels),
        "layer_num_heads": [int(layer.self_attn.num_heads) for layer in tower.encoder.layers],
        "layer_head_dims": [int(layer.self_attn.head_dim) for layer in tower.encoder.layers],
        "layer_intermediate_sizes": [channels(layer.mlp.fc1) for layer in tower.encoder.layers],
    }


def _convnext_widths(model: nn.Module) -> dict[str, Any]:
    stages = model.base_model.encoder.stages
    return {
        "stage_hidden_sizes": [int(s.layers[-1].pwconv2.out_features) for s in stages],
        "stage_intermediate_sizes": [[int(block.pwconv1.out_features) for block in s.layers] for s in stages],
    }


def _resnet_widths(model: nn.Module) -> dict[str, Any]:
    base = model.base_model
    stages = base.encoder.stages
    return {
        "pruned_embedding_size": int(base.embedder.embedder.convolution.out_channels),
        "stage_hidden_sizes": [int(s.layers[-1].layer[-1].convolution.out_channels) for s in stages],
        "stage_block_widths": [
            [[int(conv.convolution.out_channels) for conv in block.layer[:-1]] for block in s.layers] for s in stages
        ],
    }


def _mobilenet_v2_widths(model: nn.Module) -> dict[str, Any]:
    base = model.base_model
    return {
        "block_expanded_channels": [int(b.expand_1x1.convolution.out_channels) for b in base.layer],
        "block_out_channels": [int(b.reduce_1x1.convolution.out_channels) for b in base.layer],
        "pruned_last_channels": int(base.conv_1x1.convolution.out_channels),
    }


def _regnet_widths(model: nn.Module) -> dict[str, Any]:
    base = model.base_model
    stages = base.encoder.stages
    return {
        "pruned_embedding_size": int(base.embedder.embedder.convolution.out_channels),
        "stage_hidden_sizes": [int(s.layers[-1].layer[-1].convolution.out_channels) for s in stages],
        # per block: the 1x1 conv's and the grouped 3x3 conv's widths (their conv groups keep their count)
        "stage_block_widths": [
            [[int(block.layer[i].convolution.out_channels) for i in (0, 1)] for block in s.layers] for s in stages
        ],
        "stage_block_squeeze_widths": [  # squeeze-and-excitation widths (layer_type "y")
            [int(block.layer[2].attention[0].out_channels) for block in s.layers if len(block.layer) == 4]
            for s in stages
        ],
    }


def _efficientnet_widths(model: nn.Module) -> dict[str, Any]:
    encoder = model.base_model.encoder
    return {
        "block_expanded_channels": [int(b.depthwise_conv.depthwise_conv.out_channels) for b in encoder.blocks],
        "block_squeeze_channels": [int(b.squeeze_excite.reduce.out_channels) for b in encoder.blocks],
        "block_out_channels": [int(b.projection.project_conv.out_channels) for b in encoder.blocks],
        "pruned_hidden_dim": int(encoder.top_conv.out_channels),
    }


def _swin_widths(model: nn.Module) -> dict[str, Any]:
    return {
        "layer_num_heads": [int(a.num_attention_heads) for a in _modules_with(model, "q_proj", "num_attention_heads")],
        "layer_intermediate_sizes": [channels(m.fc1) for m in _modules_with(model, "fc1", "fc2")],
    }


def _swinv2_widths(model: nn.Module) -> dict[str, Any]:
    """Swin's summary from Swin V2's older module names."""
    blocks = [block for stage in model.base_model.encoder.layers for block in stage.blocks]
    return {
        "layer_num_heads": [int(block.attention.self.num_attention_heads) for block in blocks],
        "layer_intermediate_sizes": [channels(block.intermediate.dense) for block in blocks],
    }


def _levit_widths(model: nn.Module) -> dict[str, Any]:
    """Heads per attention (the subsampling ones between stages included) and hidden width per MLP, in module order."""
    return {
        "layer_num_heads": [int(m.num_attention_heads) for m in _modules_with(model, "attention_biases")],
        "layer_intermediate_sizes": [channels(m.linear_up.linear) for m in _modules_with(model, "linear_up")],
    }


def timm_widths(model: nn.Module) -> dict[str, Any]:
    """Heads per timm attention (LeViT's subsampling ones, with `kv`, included) and hidden width per timm MLP (LeViT's
    `ln1` / `ln2` MLPs included), in module order."""
    attentions = [m for m in _modules_with(model, "num_heads") if hasattr(m, "qkv") or hasattr(m, "kv")]
    hidden = [m.fc1 for m in _modules_with(model, "fc1", "fc2")]
    hidden += [m.ln1.linear for m in _modules_with(model, "ln1", "ln2") if isinstance(m.ln1, nn.Module)]
    return {
        "layer_num_heads": [int(m.num_heads) for m in attentions],
        "layer_intermediate_sizes": [channels(layer) for layer in hidden],
    }


def stock_class_of(pruned_class: type[PrunedModelMixin]) -> type[PreTrainedModel]:
    """The stock transformers class a pruned class resizes (e.g. `ViTForImageClassification`)."""
    return next(
        c for c in pruned_class.__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, PrunedModelMixin)
    )


@dataclass(frozen=True)
class Family:
    """One pruned family: the pruned model class and how its widths are summarised in ``config.json``."""

    pruned_class: type[PrunedModelMixin]
    summarize: Callable[[nn.Module], dict[str, Any]]

    @property
    def config_class(self) -> type[PrunedConfigMixin]:
        return self.pruned_class.config_class

    @property
    def stock_class(self) -> type[PreTrainedModel]:
        return stock_class_of(self.pruned_class)

    @property
    def base_model_type(self) -> str:
        """The stock model_type the family prunes (e.g. "vit")."""
        return self.config_class.base_config_class.model_type


FAMILIES: tuple[Family, ...] = (
    Family(PrunedViTForImageClassification, _vit_widths),
    Family(PrunedDeiTForImageClassification, _vit_widths),
    Family(PrunedDeiTForImageClassificationWithTeacher, _vit_widths),
    Family(PrunedDinov2ForImageClassification, _dinov2_widths),
    Family(PrunedDinov2WithRegistersForImageClassification, _dinov2_widths),
    Family(PrunedBeitForImageClassification, _vit_widths),
    Family(PrunedData2VecVisionForImageClassification, _data2vec_vision_widths),
    Family(PrunedCLIPForImageClassification, _clip_widths),
    Family(PrunedSiglipForImageClassification, _clip_widths),
    Family(PrunedConvNextForImageClassification, _convnext_widths),
    Family(PrunedConvNextV2ForImageClassification, _convnext_widths),
    Family(PrunedResNetForImageClassification, _resnet_widths),
    Family(PrunedMobileNetV2ForImageClassification, _mobilenet_v2_widths),
    Family(PrunedRegNetForImageClassification, _regnet_widths),
    Family(PrunedEfficientNetForImageClassification, _efficientnet_widths),
    Family(PrunedSwinForImageClassification, _swin_widths),
    Family(PrunedSwinv2ForImageClassification, _swinv2_widths),
    Family(PrunedLevitForImageClassification, _levit_widths),
    Family(PrunedLevitForImageClassificationWithTeacher, _levit_widths),
    Family(PrunedTimmWrapperForImageClassification, timm_widths),
    # backbones without a head, pruned on their features
    Family(PrunedViTModel, _vit_widths),
    Family(PrunedDinov2Model, _dinov2_widths),
    Family(PrunedCLIPVisionModel, _clip_widths),
)

PRUNED_MODEL_CLASSES: tuple[type[PrunedModelMixin], ...] = tuple(f.pruned_class for f in FAMILIES)
PRUNED_CONFIG_CLASSES: tuple[type[PrunedConfigMixin], ...] = tuple(f.config_class for f in FAMILIES)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(f.stock_class.__name__ for f in FAMILIES)
# Keyed by the stock class name; a pruned class maps to itself so pruned models can be pruned again.
_BY_CLASS_NAME = {name: f for f in FAMILIES for name in (f.stock_class.__name__, f.pruned_class.__name__)}


def family_of(class_name: str) -> Family | None:
    """The family of a stock or pruned model class name (e.g. "ViTForImageClassification"), or None."""
    return _BY_CLASS_NAME.get(class_name)
