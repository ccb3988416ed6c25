"""Backbones without a classification head (transformers ViTModel, Dinov2Model, CLIPVisionModel), pruned on their
features (optimum_isoprune/adapters/backbones.py, optimum_isoprune/objectives.py), and timm models created with
num_classes=0."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from transformers import AutoModel, pipeline

from models import BACKBONE_BUILDERS, TIMM_VIT_KWARGS, build, independent_macs, inputs
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.adapters import get_adapter
from optimum_isoprune.checkpoint import load_pruned_model, save_pruned_model
from optimum_isoprune.counting import count_macs, count_params
from optimum_isoprune.objectives import divergence, feature_matching_loss, importance_loss, reference

NAMES = sorted(BACKBONE_BUILDERS)
EXPECTED_CLASS = {
    "vit_backbone": "PrunedViTModel",
    "dinov2_backbone": "PrunedDinov2Model",
    "clip_backbone": "PrunedCLIPVisionModel",
}


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


@functools.lru_cache(maxsize=None)
def _half(
    name: str, reconstruction: str = "least_squares", images: int = 8
) -> tuple[nn.Module, IsomorphicPruner, nn.Module, float]:
    model = build(name)
    pruner = IsomorphicPruner(model)
    target = count_macs(model) * 0.5
    config = IsomorphicPruningConfig(
        target_macs=target, reconstruction=reconstruction, calibration_batch_size=images, num_calibration_batches=1
    )
    pruned = pruner.prune(config, calibration_dataset=inputs(pruner, batch=images))
    return model, pruner, pruned, target


def half(
    name: str, reconstruction: str = "least_squares", images: int = 8
) -> tuple[nn.Module, IsomorphicPruner, nn.Module, float]:
    model, pruner, pruned, target = _half(name, reconstruction, images)
    return model, pruner, copy.deepcopy(pruned), target


@pytest.mark.parametrize("name", NAMES)
def test_backbones_are_pruned_on_their_features(name):
    adapter = get_adapter(build(name))
    assert adapter.objective == "features"
    assert type(adapter).__name__.endswith("BackboneAdapter")


@pytest.mark.parametrize("name", NAMES)
def test_ratio_zero_gives_identical_features(name):
    model = build(name)
    pruner = IsomorphicPruner(model)
    x = inputs(pruner)
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.0, importance="magnitude"))
    assert type(pruned).__name__ == EXPECTED_CLASS[name]
    assert torch.equal(features(pruned, x), features(model, x))


@pytest.mark.parametrize("name", NAMES)
def test_half_macs_within_one_percent_counted_like_torch_and_trains(name):
    model, pruner, pruned, target = half(name)
    assert type(pruned).__name__ == EXPECTED_CLASS[name]
    assert abs(count_macs(pruned) - target) / target <= 0.01
    x = inputs(pruner)
    for ours, model_ in ((pruner.report.macs_before, build(name)), (pruner.report.macs_after, pruned)):
        theirs = independent_macs(copy.deepcopy(model_), x)
        assert abs(ours - theirs) / theirs <= 0.02
    assert pruner.report.params_after == count_params(pruned) < pruner.report.params_before
    # The features keep their width (a head is built for it); heads, head dims and MLP neurons went instead.
    assert features(pruned, x).shape == features(model, x).shape
    pruned.train()
    outputs = pruned(pixel_values=x)  # CLIP's post_layernorm is only on the pooled output's path
    (outputs.last_hidden_state.square().mean() + outputs.pooler_output.square().mean()).backward()
    trained = [(n, p) for n, p in pruned.named_parameters() if p.requires_grad and not n.endswith("mask_token")]
    assert all(p.grad is not None for _, p in trained)


def test_vit_pooler_keeps_its_outputs_and_is_resized_with_the_model():
    model, pruner, pruned, _ = half("vit_backbone")
    x = inputs(pruner)
    assert pruned.pooler.dense.weight.shape == model.pooler.dense.weight.shape  # the residual width is kept
    with torch.no_grad():
        pooled = pruned(pixel_values=x).pooler_output
    assert pooled.shape == model(pixel_values=x).pooler_output.shape and bool(torch.isfinite(pooled).all())


@pytest.mark.parametrize("name", NAMES)
def test_save_load_auto_gives_identical_features(name, tmp_path):
    _, pruner, pruned, _ = half(name)
    x = inputs(pruner)
    pruned.eval()
    expected = features(pruned, x)
    pruned.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    for loaded in (
        load_pruned_model(tmp_path),
        AutoModel.from_pretrained(tmp_path),  # the package's classes, registered on import: no remote code
        AutoModel.from_pretrained(tmp_path, trust_remote_code=True),  # the code saved beside the weights
    ):
        assert type(loaded).__name__ == EXPECTED_CLASS[name]
        assert torch.equal(features(loaded, x), expected)


def test_pruner_saves_a_backbone_with_a_feature_extraction_card(tmp_path):
    _, pruner, _, _ = _half("dinov2_backbone")
    pruner.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert "pipeline_tag: image-feature-extraction" in card
    assert "AutoModel.from_pretrained" in card and "AutoModelForImageClassification" not in card
    image = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8"))
    extracted = pipeline("image-feature-extraction", model=str(tmp_path))(image)
    assert np.isfinite(np.asarray(extracted)).all()


@pytest.mark.parametrize("name", NAMES)
def test_feature_matching_loss_is_finite_and_lower_with_reconstruction(name):
    # 32 images x 17 tokens: more rows than the widest refit layer's inputs (256), so the fit generalises
    model, pruner, with_refit, _ = half(name, images=32)
    without = half(name, reconstruction="none", images=32)[2]
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # not the calibration images
    target = features(model, x)
    on = float(feature_matching_loss(features(with_refit, x), target))
    off = float(feature_matching_loss(features(without, x), target))
    assert 0.0 < on < off < float("inf")
    assert pruner.report.reconstruction["refit_layers"] > 0


def test_search_policy_scores_backbones_on_features():
    model = build("dinov2_backbone")
    pruner = IsomorphicPruner(model)
    target = count_macs(model) * 0.5
    config = IsomorphicPruningConfig(
        target_macs=target, budget_policy="search", search_candidates=4, reconstruction="none", search_batches=1
    )
    pruned = pruner.prune(config, calibration_dataset=inputs(pruner, batch=16))
    assert abs(count_macs(pruned) - target) / target <= 0.01
    scores = pruner.report.search["start_scores"]
    assert scores and all(0.0 <= s < 1.0 for s in scores.values())  # relative feature error, not a KL
    assert pruner.report.search["objective"] == "features"
    assert "feature error relative to the original" in pruner.report.summary()


def test_objectives():
    torch.manual_seed(0)
    f = torch.randn(3, 5, 8)
    assert float(feature_matching_loss(f, f)) == 0.0
    assert float(feature_matching_loss(torch.zeros_like(f), f)) == pytest.approx(1.0)
    assert divergence(torch.zeros_like(f), reference(f, "features"), "features") == pytest.approx(3.0)
    weight = torch.randn(8, 8, requires_grad=True)
    importance_loss(f @ weight, torch.tensor([1, 2, 3]), "features", "here").backward()  # labels unused
    assert bool(weight.grad.abs().sum() > 0)  # a gradient at the unpruned model, unlike a matching loss
    logits = torch.randn(2, 4)
    assert divergence(logits, reference(logits, "logits"), "logits") == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="objective"):
        reference(logits, "pixels")


# timm models created with num_classes=0 have no head either: they are pruned on the pooled features they return.


def _timm_headless() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TIMM_VIT_KWARGS, "num_classes": 0}).eval()


def test_timm_vit_without_head_is_pruned_on_its_features(tmp_path):
    model = _timm_headless()
    pruner = IsomorphicPruner(model)
    assert pruner.adapter.objective == "features"
    x = inputs(pruner)
    zero = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.0, importance="magnitude"))
    with torch.no_grad():
        assert torch.equal(zero(x), model(x))
    target = count_macs(model) * 0.5
    results = {}
    for reconstruction in ("least_squares", "none"):
        config = IsomorphicPruningConfig(
            target_macs=target, reconstruction=reconstruction, calibration_batch_size=32, num_calibration_batches=1
        )
        results[reconstruction] = pruner.prune(config, calibration_dataset=inputs(pruner, batch=32))
    pruned = results["least_squares"]
    assert abs(count_macs(pruned) - target) / target <= 0.01
    theirs = independent_macs(copy.deepcopy(pruned), x)
    assert abs(count_macs(pruned) - theirs) / theirs <= 0.02
    held_out = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference_features = model(held_out)
        on = float(feature_matching_loss(pruned(held_out), reference_features))
        off = float(feature_matching_loss(results["none"](held_out), reference_features))
    assert 0.0 < on < off < float("inf")  # the feature width is kept, so the features compare
    save_pruned_model(pruned, tmp_path)
    loaded = load_pruned_model(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned.eval()(x))


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet18", {}),  # the last block's conv3, coupled to the last stage's residual width
        ("convnext_atto", dict(dims=(32, 64, 96, 128), depths=(1, 1, 2, 1))),
        ("mobilenetv3_small_050", {}),  # conv_head after the pooling
    ],
)
def test_timm_cnn_without_head_keeps_its_feature_width(name, kwargs, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    pruner = IsomorphicPruner(model)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = count_macs(model, image_size=32) * 0.5
    config = IsomorphicPruningConfig(target_macs=target, image_size=32, calibration_batch_size=8)
    pruned = pruner.prune(config, calibration_dataset=x)
    assert abs(count_macs(pruned, image_size=32) - target) / target <= 0.01
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape  # a head built for the original features still fits
    save_pruned_model(pruned, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_pruned_model(tmp_path).eval()(x), pruned.eval()(x))
