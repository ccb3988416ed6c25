"""Tiny random models, one per row of the support matrix (no downloads)."""

from __future__ import annotations

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BeitConfig,
    BeitForImageClassification,
    CLIPConfig,
    CLIPForImageClassification,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    Data2VecVisionConfig,
    Data2VecVisionForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    EfficientNetConfig,
    EfficientNetForImageClassification,
    LevitConfig,
    LevitForImageClassification,
    LevitForImageClassificationWithTeacher,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    RegNetConfig,
    RegNetForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    SiglipConfig,
    SiglipForImageClassification,
    SwinConfig,
    SwinForImageClassification,
    Swinv2Config,
    Swinv2ForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from optimum_isoprune import IsomorphicPruner
from optimum_isoprune.adapters import get_adapter

IMAGE_SIZE = 32
VIT_KWARGS = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=256,
    image_size=IMAGE_SIZE,
    patch_size=8,
    num_labels=10,
)
# DINOv2 has no intermediate_size (mlp_ratio sets the MLP width); layer scale starts away from 1 so it matters.
DINOV2_KWARGS = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    mlp_ratio=4,
    layerscale_value=0.5,
    image_size=IMAGE_SIZE,
    patch_size=8,
    num_labels=10,
)
# BEiT: layer scale away from 1; bias tables per layer (mean-pooling head) or one shared by every layer (with
# absolute position embeddings and the cls token's LayerNorm head instead).
BEIT_KWARGS = dict(VIT_KWARGS, layer_scale_init_value=0.5)
BEIT_SHARED_KWARGS = dict(
    BEIT_KWARGS, use_shared_relative_position_bias=True, use_absolute_position_embeddings=True, use_mean_pooling=False
)
# Three base stages: no expansion (ratio 1), then ratio 6 with depthwise 3x3 / 5x5, SE, residual repeats and a
# stride-2 block padded symmetrically (depthwise_padding); hidden_dim is the top conv's width, round_filters(1280).
EFFICIENTNET_KWARGS = dict(
    image_size=IMAGE_SIZE,
    width_coefficient=0.5,
    depth_coefficient=1.0,
    kernel_sizes=[3, 3, 5],
    in_channels=[32, 16, 24],
    out_channels=[16, 24, 40],
    strides=[1, 2, 2],
    num_block_repeats=[1, 2, 2],
    expand_ratios=[1, 6, 6],
    depthwise_padding=[3],
    hidden_dim=640,
    num_labels=10,
)
# A CLIP classifier builds only the vision tower (the text config's defaults are never instantiated).
CLIP_VISION_KWARGS = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=256,
    image_size=IMAGE_SIZE,
    patch_size=8,
)
CONVNEXT_KWARGS = dict(hidden_sizes=[32, 64], depths=[2, 2], num_stages=2, image_size=IMAGE_SIZE, num_labels=10)
SWIN_KWARGS = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
# LeViT: three stages (two subsampling attentions between them), 16-pixel patches, key dim 8, value dim 16 (32 in the
# subsampling attentions)
LEVIT_KWARGS = dict(
    image_size=IMAGE_SIZE, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4], depths=[1, 1, 1], key_dim=[8, 8, 8]
)
TIMM_VIT_KWARGS = dict(img_size=IMAGE_SIZE, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=10)


def _timm_wrapper(architecture: str = "vit_tiny_patch16_224", vit: bool = True) -> torch.nn.Module:
    model_args = {k: v for k, v in TIMM_VIT_KWARGS.items() if k != "num_classes"} if vit else None
    config = TimmWrapperConfig(
        architecture=architecture,
        num_labels=10,
        model_args=model_args,
        pretrained_cfg={"input_size": [3, IMAGE_SIZE, IMAGE_SIZE], "num_classes": 10},
    )
    return TimmWrapperForImageClassification(config)


BUILDERS = {
    "vit": lambda: ViTForImageClassification(ViTConfig(**VIT_KWARGS)),
    "deit": lambda: DeiTForImageClassification(DeiTConfig(**VIT_KWARGS)),
    "deit_teacher": lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**VIT_KWARGS)),
    "dinov2": lambda: Dinov2ForImageClassification(Dinov2Config(**DINOV2_KWARGS)),
    "beit": lambda: BeitForImageClassification(BeitConfig(use_relative_position_bias=True, **BEIT_KWARGS)),
    "beit_shared": lambda: BeitForImageClassification(BeitConfig(**BEIT_SHARED_KWARGS)),
    # eager: torch's flop counter sees no FLOPs in CPU SDPA (tests/test_beit.py prunes the SDPA class too)
    "data2vec_vision": lambda: Data2VecVisionForImageClassification(
        Data2VecVisionConfig(use_relative_position_bias=True, attn_implementation="eager", **BEIT_KWARGS)
    ),
    "clip": lambda: CLIPForImageClassification(CLIPConfig(vision_config=CLIP_VISION_KWARGS, num_labels=10)),
    # SigLIP's attention-pooling head never feeds the classifier: the pruner drops it (tests/test_siglip.py); this
    # row has none, so the matrix's counts compare like with like.
    "siglip": lambda: SiglipForImageClassification(
        SiglipConfig(vision_config={**CLIP_VISION_KWARGS, "vision_use_head": False}, num_labels=10)
    ),
    "convnext": lambda: ConvNextForImageClassification(ConvNextConfig(**CONVNEXT_KWARGS)),
    "convnextv2": lambda: ConvNextV2ForImageClassification(ConvNextV2Config(**CONVNEXT_KWARGS)),
    "resnet": lambda: ResNetForImageClassification(
        ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 2], layer_type="bottleneck", num_labels=10)
    ),
    "mobilenet_v2": lambda: MobileNetV2ForImageClassification(
        MobileNetV2Config(image_size=IMAGE_SIZE, depth_multiplier=0.35, num_labels=10)
    ),
    # grouped 3x3 convs (groups_width 8: 4 and 8 conv groups) + squeeze-and-excitation
    "regnet": lambda: RegNetForImageClassification(
        RegNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 2], groups_width=8, num_labels=10)
    ),
    "efficientnet": lambda: EfficientNetForImageClassification(EfficientNetConfig(**EFFICIENTNET_KWARGS)),
    "timm_vit": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_VIT_KWARGS),
    "timm_deit_distilled": lambda: timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, **TIMM_VIT_KWARGS
    ),
    "timm_convnext": lambda: timm.create_model(
        "convnext_atto", pretrained=False, num_classes=10, dims=(32, 64, 96, 128), depths=(1, 1, 2, 1)
    ),
    "timm_resnet": lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
    "timm_wrapper": _timm_wrapper,
    "hf_swin": lambda: SwinForImageClassification(
        SwinConfig(
            image_size=IMAGE_SIZE,
            patch_size=2,
            num_labels=10,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in SWIN_KWARGS.items()},
        )
    ),
    "timm_swin": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=IMAGE_SIZE,
        patch_size=2,
        num_classes=10,
        **SWIN_KWARGS,
    ),
    "hf_swinv2": lambda: Swinv2ForImageClassification(
        Swinv2Config(
            image_size=IMAGE_SIZE,
            patch_size=2,
            num_labels=10,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in SWIN_KWARGS.items()},
        )
    ),
}


# Topology variants of families in BUILDERS, in the matrix but not in the per-feature suites that iterate BUILDERS
# (tests/test_dinov2.py, tests/test_transformers_cnns.py show what they add).
VARIANT_BUILDERS = {
    "dinov2_swiglu": lambda: Dinov2ForImageClassification(Dinov2Config(use_swiglu_ffn=True, **DINOV2_KWARGS)),
    "dinov2_registers": lambda: Dinov2WithRegistersForImageClassification(
        Dinov2WithRegistersConfig(num_register_tokens=2, **DINOV2_KWARGS)
    ),
    # LeViT (tests/test_levit.py): whole heads, MLP hidden and patch-embedding channels; stage widths kept
    "levit": lambda: LevitForImageClassification(LevitConfig(num_labels=10, **LEVIT_KWARGS)),
    "levit_teacher": lambda: LevitForImageClassificationWithTeacher(LevitConfig(num_labels=10, **LEVIT_KWARGS)),
    # q / k norms over the head dim (timm's qk_norm): head dims kept, heads pruned
    "timm_vit_qk_norm": lambda: timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, qk_norm=True, **TIMM_VIT_KWARGS
    ),
    "timm_wrapper_qk_norm": lambda: TimmWrapperForImageClassification(
        TimmWrapperConfig(
            architecture="vit_tiny_patch16_224",
            num_labels=10,
            model_args={**{k: v for k, v in TIMM_VIT_KWARGS.items() if k != "num_classes"}, "qk_norm": True},
            pretrained_cfg={"input_size": [3, IMAGE_SIZE, IMAGE_SIZE], "num_classes": 10},
        )
    ),
    "timm_eva02_qk_norm": lambda: timm.create_model(
        "eva02_tiny_patch14_224", pretrained=False, qk_norm=True, **TIMM_VIT_KWARGS
    ),
    # RmsNorm: not an nn.LayerNorm, its normalized_shape follows its pruned weight
    "timm_vit_rmsnorm": lambda: timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, norm_layer="rmsnorm", **TIMM_VIT_KWARGS
    ),
    # timm's DINOv2 giant layout: a packed SwiGLU MLP (one fc1 holding gate and value) and layer scale
    "timm_vit_swiglu_packed": lambda: timm.create_model(
        "vit_giant_patch14_dinov2", pretrained=False, **{**TIMM_VIT_KWARGS, "mlp_ratio": 4.0}
    ),
    # GroupNorm: every norm group keeps the same number of channels, as a grouped conv's groups do
    "timm_efficientnet_gn": lambda: _timm_cnn("efficientnet_b0_gn", 64),
    # efficient channel attention (ecaresnet*): a 1-channel Conv1d along the channel axis
    "timm_resnet_eca": lambda: timm.create_model(
        "resnet18",
        pretrained=False,
        num_classes=10,
        block_args=dict(attn_layer="eca"),
        pretrained_cfg_overlay=dict(input_size=(3, IMAGE_SIZE, IMAGE_SIZE)),
    ),
    # anti-aliased downsampling (BlurPool2d): one fixed filter per channel, a buffer torch-pruning never slices
    "timm_resnet_blur": lambda: _timm_cnn("resnetblur18", IMAGE_SIZE),
    "regnet_x": lambda: RegNetForImageClassification(  # RegNet's X layers: no squeeze-and-excitation
        RegNetConfig(
            embedding_size=16, hidden_sizes=[32, 64], depths=[1, 2], groups_width=8, layer_type="x", num_labels=10
        )
    ),
}


# Backbones without a head, pruned on their features (tests/test_backbones.py). ViTModel keeps its pooler.
BACKBONE_BUILDERS = {
    "vit_backbone": lambda: ViTModel(ViTConfig(**{k: v for k, v in VIT_KWARGS.items() if k != "num_labels"})),
    "dinov2_backbone": lambda: Dinov2Model(
        Dinov2Config(**{k: v for k, v in DINOV2_KWARGS.items() if k != "num_labels"})
    ),
    "clip_backbone": lambda: CLIPVisionModel(CLIPVisionConfig(**CLIP_VISION_KWARGS)),
}


def _timm_cnn(name: str, image_size: int = 64) -> torch.nn.Module:
    """A timm CNN at its real width, fed small images (its pretrained_cfg says which size) to stay fast."""
    return timm.create_model(
        name, pretrained=False, num_classes=10, pretrained_cfg_overlay=dict(input_size=(3, image_size, image_size))
    )


# timm families beyond the support matrix above (tests/test_timm_families.py): what each adds is in the comment.
TIMM_FAMILY_BUILDERS = {
    "timm_efficientnet": lambda: _timm_cnn("efficientnet_b0", 32),  # depthwise convs + squeeze-and-excitation
    "timm_mobilenetv3": lambda: _timm_cnn("mobilenetv3_small_050"),  # hard-swish SE, a conv head after pooling
    "timm_regnety": lambda: _timm_cnn("regnety_002", 32),  # grouped convs + SE
    # layer scale
    "timm_deit3": lambda: timm.create_model("deit3_small_patch16_224", pretrained=False, **TIMM_VIT_KWARGS),
    # the transformers shell around them
    "timm_wrapper_deit3": lambda: _timm_wrapper("deit3_small_patch16_224"),
    "timm_wrapper_mobilenetv3": lambda: _timm_wrapper("mobilenetv3_small_050", vit=False),
    # Swin V2: cosine attention, logit scales and position-bias MLPs per head, qkv with separate biases
    "timm_swinv2": lambda: timm.create_model(
        "swinv2_tiny_window8_256", pretrained=False, img_size=IMAGE_SIZE, patch_size=2, num_classes=10, **SWIN_KWARGS
    ),
    # separate q / v biases on a fused qkv, heads reshaped to the input width, a bias table per block, layer scale
    "timm_beit": lambda: timm.create_model("beit_base_patch16_224", pretrained=False, **TIMM_VIT_KWARGS),
    # the same plus rotary embeddings (head dims kept) and a packed SwiGLU MLP
    "timm_eva02": lambda: timm.create_model("eva02_tiny_patch14_224", pretrained=False, **TIMM_VIT_KWARGS),
}


# LeViT (tests/test_levit.py), the distilled model timm builds by default and the plain one
TIMM_LEVIT_KWARGS = dict(
    num_classes=10,
    img_size=IMAGE_SIZE,
    embed_dim=(32, 48, 64),
    num_heads=(2, 3, 4),
    depth=(1, 1, 1),
    key_dim=8,
    pretrained_cfg_overlay=dict(input_size=(3, IMAGE_SIZE, IMAGE_SIZE)),
)
TIMM_FAMILY_BUILDERS["timm_levit"] = lambda: timm.create_model("levit_128s", pretrained=False, **TIMM_LEVIT_KWARGS)
TIMM_FAMILY_BUILDERS["timm_levit_plain"] = lambda: timm.create_model(
    "levit_128s", pretrained=False, distilled=False, **TIMM_LEVIT_KWARGS
)


# Classifiers the pruner changes before counting (SigLIP's attention-pooling head never feeds the classifier and is
# dropped): tests/test_siglip.py holds them to the matrix's guarantees against the model actually pruned.
OFF_MATRIX_BUILDERS = {
    "siglip_head": lambda: SiglipForImageClassification(SiglipConfig(vision_config=CLIP_VISION_KWARGS, num_labels=10)),
}

# The support matrix (tests/test_pruner.py): every classifier builder. Backbones are held to the same guarantees on
# their features in tests/test_backbones.py.
MATRIX = {**BUILDERS, **VARIANT_BUILDERS, **TIMM_FAMILY_BUILDERS}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = {**MATRIX, **OFF_MATRIX_BUILDERS, **BACKBONE_BUILDERS}[name]().eval()
    with torch.no_grad():  # transformers initialises Swin's bias tables to zero: make every head's column distinct
        for param_name, param in model.named_parameters():
            if param_name.endswith(("relative_position_bias_table", "attention_biases")):  # LeViT's too
                param.normal_(std=0.5)
            # DINOv2 initialises them to zero too, BEiT its position embeddings
            if param_name.endswith(("register_tokens", "mask_token", "embeddings.position_embeddings")):
                param.normal_(std=0.5)
            # Swin V2 starts every head at the same logit scale, timm BEiT / EVA / Swin V2 their q / v biases at zero
            if param_name.endswith(("logit_scale", "q_bias", "v_bias")):
                param.add_(torch.randn_like(param), alpha=0.5)
    return model


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x) if not hasattr(model, "config") or not hasattr(model.config, "model_type") else model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out


def inputs(pruner: IsomorphicPruner, batch: int = 2) -> torch.Tensor:
    """Random images of the size and channels the pruner's model takes (the same every call)."""
    size = pruner.adapter.image_size()
    return torch.randn(batch, pruner.adapter.num_channels(), size, size, generator=torch.Generator().manual_seed(1))


def independent_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    """torch's FlopCounterMode (FLOPs / 2) with every attention matmul visible (eager paths)."""
    if hasattr(model, "set_attn_implementation") and get_adapter(model).attentions(model):
        model.set_attn_implementation("eager")
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        logits(model, x[:1])
    return counter.get_total_flops() / 2
