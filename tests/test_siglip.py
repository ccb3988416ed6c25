"""SigLIP (transformers `SiglipForImageClassification`) with its attention-pooling head (`vision_use_head`, the
default of SigLIP checkpoints): the classifier never reads the head, the pruner drops it. The support matrix's
"siglip" row (tests/models.py BUILDERS) is the tower without a head."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from models import build, independent_macs, inputs, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.adapters.clip import drop_unused_pooling_head
from optimum_isoprune.checkpoint import load_pruned_model
from optimum_isoprune.counting import count_macs, count_params


def with_head() -> nn.Module:
    return build("siglip_head")


@functools.lru_cache(maxsize=None)
def _half() -> tuple[IsomorphicPruner, nn.Module, float]:
    model = with_head()
    pruner = IsomorphicPruner(model)
    target = count_macs(model) * 0.5
    pruned = pruner.prune(IsomorphicPruningConfig(target_macs=target), calibration_dataset=inputs(pruner, batch=8))
    return pruner, pruned, target


def half() -> tuple[IsomorphicPruner, nn.Module, float]:
    pruner, pruned, target = _half()
    return pruner, copy.deepcopy(pruned), target


def test_ratio_zero_gives_identical_logits_without_the_head():
    model = with_head()
    pruner = IsomorphicPruner(model)
    x = inputs(pruner)
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.0, importance="magnitude"))
    assert torch.equal(logits(pruned, x), logits(model, x))
    assert model.vision_model.use_head and hasattr(model.vision_model, "head")  # the caller's model is left whole
    assert not pruned.vision_model.use_head and not hasattr(pruned.vision_model, "head")
    assert pruned.config.vision_config.vision_use_head is False


def test_the_head_is_counted_like_torch():
    """count_macs sees the head's nn.MultiheadAttention (its projections run as F.linear on its own weights)."""
    model = with_head()
    x = inputs(IsomorphicPruner(model))
    assert count_macs(model) == pytest.approx(independent_macs(copy.deepcopy(model), x), rel=1e-6)


def test_half_macs_within_one_percent_counted_like_torch_and_trains():
    pruner, pruned, target = half()
    assert type(pruned).__name__ == "PrunedSiglipForImageClassification"
    assert abs(count_macs(pruned) - target) / target <= 0.01
    assert count_macs(pruned) == pruner.report.macs_after
    x = inputs(pruner)
    headless = with_head()
    drop_unused_pooling_head(headless)  # the report counts the model being pruned: without the head
    for ours, model_ in ((pruner.report.macs_before, headless), (pruner.report.macs_after, pruned)):
        theirs = independent_macs(copy.deepcopy(model_), x)
        assert abs(ours - theirs) / theirs <= 0.02
    assert pruner.report.params_after == count_params(pruned) < pruner.report.params_before
    pruned.train()
    nn.functional.cross_entropy(logits(pruned, x), torch.arange(len(x))).backward()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)


def test_reloaded_model_has_no_head(tmp_path):
    """Save -> load is exact (tests/test_modeling.py "siglip_head"); the head stays gone after reloading."""
    _, pruned, _ = half()
    pruned.save_pretrained(tmp_path)
    loaded = load_pruned_model(tmp_path)
    assert not loaded.vision_model.use_head and not hasattr(loaded.vision_model, "head")


def test_summary_fields_match_the_modules():
    pruned = half()[1]
    layers = pruned.vision_model.encoder.layers
    assert pruned.config.layer_num_heads == [layer.self_attn.num_heads for layer in layers]
    assert pruned.config.layer_head_dims == [layer.self_attn.head_dim for layer in layers]
    assert pruned.config.layer_intermediate_sizes == [layer.mlp.fc1.out_features for layer in layers]
    assert pruned.config.pruned_hidden_size == pruned.vision_model.post_layernorm.normalized_shape[0]
