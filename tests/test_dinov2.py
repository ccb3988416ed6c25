"""DINOv2 (transformers): what it adds to a ViT, and its variants (SwiGLU MLP, register tokens) held to the support
matrix's guarantees. The plain "dinov2" row is in the matrix itself (tests/models.py BUILDERS)."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForImageClassification, pipeline

from models import DINOV2_VARIANT_BUILDERS, build, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.checkpoint import load_pruned_model
from optimum_isoprune.counting import count_macs, count_params
from test_pruner import _inputs, independent_macs

VARIANTS = sorted(DINOV2_VARIANT_BUILDERS)
EXPECTED_CLASS = {
    "dinov2": "PrunedDinov2ForImageClassification",
    "dinov2_swiglu": "PrunedDinov2ForImageClassification",
    "dinov2_registers": "PrunedDinov2WithRegistersForImageClassification",
}


@functools.lru_cache(maxsize=None)
def _half(name: str) -> tuple[nn.Module, IsomorphicPruner, nn.Module, float]:
    model = build(name)
    pruner = IsomorphicPruner(model)
    target = count_macs(model) * 0.5
    pruned = pruner.prune(IsomorphicPruningConfig(target_macs=target), calibration_dataset=_inputs(pruner, batch=8))
    return model, pruner, pruned, target


def half(name: str) -> tuple[nn.Module, IsomorphicPruner, nn.Module, float]:
    model, pruner, pruned, target = _half(name)
    return model, pruner, copy.deepcopy(pruned), target


@pytest.mark.parametrize("name", VARIANTS)
def test_ratio_zero_gives_identical_logits(name):
    model = build(name)
    pruner = IsomorphicPruner(model)
    x = _inputs(pruner)
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.0, importance="magnitude"))
    assert torch.equal(logits(pruned, x), logits(model, x))


@pytest.mark.parametrize("name", VARIANTS)
def test_half_macs_within_one_percent_counted_like_torch_and_trains(name):
    model, pruner, pruned, target = half(name)
    assert type(pruned).__name__ == EXPECTED_CLASS[name]
    assert abs(count_macs(pruned) - target) / target <= 0.01
    x = _inputs(pruner)
    for ours, model_ in ((pruner.report.macs_before, build(name)), (pruner.report.macs_after, pruned)):
        theirs = independent_macs(copy.deepcopy(model_), x)
        assert abs(ours - theirs) / theirs <= 0.02
    assert pruner.report.params_after == count_params(pruned) < pruner.report.params_before
    pruned.train()
    nn.functional.cross_entropy(logits(pruned, x), torch.arange(len(x))).backward()
    trained = [(n, p) for n, p in pruned.named_parameters() if p.requires_grad and not n.endswith("mask_token")]
    assert all(p.grad is not None for _, p in trained)  # the mask token serves masked-image modelling only


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


@pytest.mark.parametrize("name", VARIANTS)
def test_save_load_auto_and_pipeline(name, tmp_path):
    _, pruner, pruned, _ = half(name)
    x = _inputs(pruner)
    larger = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))  # interpolated position embeddings
    pruned.eval()
    expected, expected_larger = logits(pruned, x), logits(pruned, larger)
    pruned.save_pretrained(tmp_path)
    for loaded in (
        load_pruned_model(tmp_path),
        AutoModelForImageClassification.from_pretrained(tmp_path, trust_remote_code=True),
        AutoModelForImageClassification.from_pretrained(tmp_path),
    ):
        assert type(loaded).__name__ == EXPECTED_CLASS[name]
        assert torch.equal(logits(loaded, x), expected)
        assert torch.equal(logits(loaded, larger), expected_larger)
    image = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8"))
    classifier = pipeline("image-classification", model=str(tmp_path), trust_remote_code=True)
    predictions = classifier(image, top_k=10)
    inputs = classifier.image_processor(image, return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (x.shape[-2], x.shape[-1])
    with torch.no_grad():
        probs = logits(pruned, inputs["pixel_values"]).softmax(-1)[0]
    assert predictions[0]["score"] == pytest.approx(probs.max().item(), abs=1e-6)


def test_the_pruned_mask_token_still_masks():
    _, _, pruned, _ = half("dinov2")
    embeddings = pruned.base_model.embeddings
    x = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, :5] = True
    masked = embeddings(x, bool_masked_pos=mask)
    assert masked.shape == embeddings(x).shape
    assert not torch.equal(masked, embeddings(x))


def test_summary_fields_match_the_modules():
    for name in ("dinov2", "dinov2_swiglu"):
        pruned = half(name)[2]
        mlps = [layer.mlp for layer in pruned.base_model.encoder.layer]
        widths = [(m.fc1 if hasattr(m, "fc1") else m.up_proj).out_features for m in mlps]
        assert pruned.config.layer_intermediate_sizes == widths
        assert pruned.config.pruned_hidden_size == pruned.base_model.embeddings.cls_token.shape[-1]
        assert pruned.config.layer_num_heads == [
            layer.attention.num_attention_heads for layer in pruned.base_model.encoder.layer
        ]
