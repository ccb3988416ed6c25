"""Configurations of supported classes that the pruner refuses, with what is missing and what to do instead."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import SwiGLU
from timm.models import vision_transformer
from transformers import (
    SwinConfig,
    SwinForImageClassification,
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from models import IMAGE_SIZE, TIMM_VIT_KWARGS, VIT_KWARGS
from optimum_isoprune import (
    IsomorphicPruner,
    IsomorphicPruningConfig,
    UnsupportedModelError,
    load_pruned_model,
    save_pruned_model,
)


def _timm_vit(**kwargs):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TIMM_VIT_KWARGS, **kwargs})


def test_attention_pooling_head_is_refused_with_the_way_around_it():
    mapped = _timm_vit(global_pool="map")
    with pytest.raises(UnsupportedModelError, match=r"attention-pooling head \(timm global_pool='map'\)"):
        IsomorphicPruner(mapped)
    # What the message says to do: the same network without attn_pool loads every other weight and is pruned.
    pooled = _timm_vit(global_pool="avg", fc_norm=False)
    result = pooled.load_state_dict(mapped.state_dict(), strict=False)
    assert not result.missing_keys and all(k.startswith("attn_pool.") for k in result.unexpected_keys)
    IsomorphicPruner(pooled)


def test_wrapped_attention_pooling_head_is_refused():
    config = TimmWrapperConfig(
        architecture="vit_tiny_patch16_224",
        num_labels=10,
        model_args={**{k: v for k, v in TIMM_VIT_KWARGS.items() if k != "num_classes"}, "global_pool": "map"},
    )
    with pytest.raises(UnsupportedModelError, match="TimmWrapperForImageClassification has an attention-pooling head"):
        IsomorphicPruner(TimmWrapperForImageClassification(config))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_fn=vision_transformer.ParallelScalingBlock), "built from ParallelScalingBlock blocks"),
        (dict(attn_layer="diff"), r"differential attention \(attn_layer='diff'\)"),
    ],
    ids=["parallel_scaling", "diff"],
)
def test_unmapped_vit_layers_are_refused(kwargs, message):
    with pytest.raises(UnsupportedModelError, match=message):
        IsomorphicPruner(_timm_vit(**kwargs))


@pytest.mark.parametrize("name", ["skresnet18", "resnest14d"])
def test_split_attention_resnets_are_refused(name):
    with pytest.raises(UnsupportedModelError, match=r"\(skresnet\*, resnest\*\): one conv's outputs hold every branch"):
        IsomorphicPruner(timm.create_model(name, pretrained=False, num_classes=10))


def test_mixed_kernel_convs_are_refused():
    with pytest.raises(UnsupportedModelError, match=r"uses MixedConv2d \(mixnet_\*\)"):
        IsomorphicPruner(timm.create_model("mixnet_s", pretrained=False, num_classes=10))


@pytest.mark.parametrize(
    "build",
    [
        lambda: _timm_vit(img_size=(IMAGE_SIZE, 48)),
        lambda: ViTForImageClassification(ViTConfig(**{**VIT_KWARGS, "image_size": (IMAGE_SIZE, 48)})),
        lambda: SwinForImageClassification(
            SwinConfig(image_size=(IMAGE_SIZE, 48), patch_size=2, embed_dim=16, depths=[2], num_heads=[2])
        ),
    ],
    ids=["timm_vit", "vit", "swin"],
)
def test_non_square_input_is_refused(build):
    with pytest.raises(UnsupportedModelError, match=rf"takes {IMAGE_SIZE}x48 images; .* square image size"):
        IsomorphicPruner(build())


def test_timm_class_arguments_are_refused_at_save_before_writing(tmp_path):
    """A class passed to timm.create_model (mlp_layer=SwiGLU) prunes, but config.json cannot name it for the reload."""
    pruner = IsomorphicPruner(_timm_vit(mlp_layer=SwiGLU))
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.25, importance="magnitude"))
    with pytest.raises(UnsupportedModelError, match=r"built with mlp_layer=SwiGLU, which .* config.json cannot record"):
        save_pruned_model(pruned, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_wrapped_blur_pool_reloads_at_its_pruned_width(tmp_path):
    """BlurPool2d is saved in timm's fixed-width form at the width it is given (a transformers reload runs no hook)."""
    config = TimmWrapperConfig(
        architecture="resnetblur18", num_labels=10, pretrained_cfg={"input_size": [3, IMAGE_SIZE, IMAGE_SIZE]}
    )
    pruned = IsomorphicPruner(TimmWrapperForImageClassification(config).eval()).prune(
        IsomorphicPruningConfig(pruning_ratio=0.3, importance="magnitude")
    )
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    save_pruned_model(pruned, tmp_path)
    assert torch.equal(load_pruned_model(tmp_path).eval()(x).logits, pruned.eval()(x).logits)
