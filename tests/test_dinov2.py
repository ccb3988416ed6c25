"""DINOv2 (transformers): what it adds to a ViT, and its variants (SwiGLU MLP, register tokens) held to the support
matrix's guarantees. The plain "dinov2" row is in the matrix itself (tests/models.py BUILDERS)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageClassification

from models import VARIANT_BUILDERS, build, inputs, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.checkpoint import load_pruned_model
from optimum_isoprune.counting import count_macs

VARIANTS = sorted(n for n in VARIANT_BUILDERS if n.startswith("dinov2"))


@functools.lru_cache(maxsize=None)
def _half(name: str) -> nn.Module:
    model = build(name)
    pruner = IsomorphicPruner(model)
    config = IsomorphicPruningConfig(target_macs=count_macs(model) * 0.5)
    return pruner.prune(config, calibration_dataset=inputs(pruner, batch=8))


def half(name: str) -> nn.Module:
    """`name` pruned to half its MACs (a fresh copy every call)."""
    return copy.deepcopy(_half(name))


@pytest.mark.parametrize("name", ["dinov2", *VARIANTS])
def test_residual_channels_are_removed_from_every_tensor_that_carries_them(name):
    """Layer scales, mask / register tokens and both halves of the classifier (cls token, mean of patch tokens)
    lose the same residual channels as the cls token (no calibration data: no reconstruction refits the weights)."""
    model = build(name)
    pruned = IsomorphicPruner(model).prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude"))
    base, pruned_base = model.base_model, pruned.base_model
    hidden = base.config.hidden_size
    original_cls = base.embeddings.cls_token.flatten()
    kept = torch.tensor([int((original_cls == v).nonzero()) for v in pruned_base.embeddings.cls_token.flatten()])
    assert 0 < len(kept) < hidden
    for old, new in zip(base.encoder.layer, pruned_base.encoder.layer):
        for scale in ("layer_scale1", "layer_scale2"):
            assert torch.equal(getattr(new, scale).lambda1, getattr(old, scale).lambda1[kept])
    assert torch.equal(pruned_base.embeddings.mask_token, base.embeddings.mask_token[:, kept])
    if hasattr(base.embeddings, "register_tokens"):
        assert torch.equal(pruned_base.embeddings.register_tokens, base.embeddings.register_tokens[..., kept])
    assert torch.equal(pruned.classifier.weight, model.classifier.weight[:, torch.cat([kept, hidden + kept])])


@pytest.mark.parametrize("name", ["dinov2", *VARIANTS])
def test_reloaded_model_interpolates_position_embeddings_for_larger_images(name, tmp_path):
    """The matrix checks save -> load at the training size (tests/test_modeling.py); a larger image makes the
    pruned position embeddings be interpolated, at the pruned width, identically after reloading."""
    pruned = half(name).eval()
    larger = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    expected = logits(pruned, larger)
    pruned.save_pretrained(tmp_path)
    for loaded in (load_pruned_model(tmp_path), AutoModelForImageClassification.from_pretrained(tmp_path)):
        assert torch.equal(logits(loaded, larger), expected)


def test_the_pruned_mask_token_still_masks():
    pruned = half("dinov2")
    embeddings = pruned.base_model.embeddings
    x = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, :5] = True
    masked = embeddings(x, bool_masked_pos=mask)
    assert masked.shape == embeddings(x).shape
    assert not torch.equal(masked, embeddings(x))


def test_summary_fields_match_the_modules():
    for name in ("dinov2", "dinov2_swiglu"):
        pruned = half(name)
        mlps = [layer.mlp for layer in pruned.base_model.encoder.layer]
        widths = [(m.fc1 if hasattr(m, "fc1") else m.up_proj).out_features for m in mlps]
        assert pruned.config.layer_intermediate_sizes == widths
        assert pruned.config.pruned_hidden_size == pruned.base_model.embeddings.cls_token.shape[-1]
        assert pruned.config.layer_num_heads == [
            layer.attention.num_attention_heads for layer in pruned.base_model.encoder.layer
        ]
