"""The support matrix: every classifier family, tiny random weights (tests/models.py MATRIX)."""

from __future__ import annotations

import pytest
import torch

from models import MATRIX, build, independent_macs, inputs, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.adapters import get_adapter
from optimum_isoprune.counting import count_macs, count_params


@pytest.fixture(scope="module", params=sorted(MATRIX))
def pruned_half(request):
    model = build(request.param)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = IsomorphicPruner(model)
    x = inputs(pruner, batch=8)
    target = count_macs(model) * 0.5
    pruned = pruner.prune(IsomorphicPruningConfig(target_macs=target), calibration_dataset=x)
    return request.param, model, reference, pruner, pruned, target


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_ratio_zero_gives_identical_logits(name):
    model = build(name)
    pruner = IsomorphicPruner(model)
    x = inputs(pruner)
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.0, importance="magnitude"))
    assert pruned is not model
    assert torch.equal(logits(pruned, x), logits(model, x))
    assert pruner.report.macs_after == pruner.report.macs_before


def test_half_macs_hits_target_within_one_percent(pruned_half):
    name, model, reference, pruner, pruned, target = pruned_half
    achieved = count_macs(pruned)
    assert achieved == pruner.report.macs_after
    assert abs(achieved - target) / target <= 0.01, name


def test_independent_counter_agrees(pruned_half):
    name, model, reference, pruner, pruned, target = pruned_half
    x = inputs(pruner)
    ours_before, ours_after = pruner.report.macs_before, pruner.report.macs_after
    theirs_before = independent_macs(build(name), x)
    theirs_after = independent_macs(pruned, x)
    assert abs(ours_before - theirs_before) / theirs_before <= 0.02
    assert abs(ours_after - theirs_after) / theirs_after <= 0.02


def test_pruned_model_runs_forward_and_backward(pruned_half):
    name, model, reference, pruner, pruned, target = pruned_half
    x = inputs(pruner)
    pruned.train()
    out = logits(pruned, x)
    assert out.shape == logits(model, x).shape
    out.sum().backward()
    # DINOv2's mask token serves masked-image modelling only, CLIP's post_layernorm only the pooled cls token (the
    # classifier reads the mean patch token): no gradient reaches them from the classifier.
    off_path = ("mask_token", *(("post_layernorm.weight", "post_layernorm.bias") if name == "clip" else ()))
    grads = [p.grad for n, p in pruned.named_parameters() if p.requires_grad and not n.endswith(off_path)]
    assert grads and all(g is not None for g in grads)
    assert pruner.report.params_after == count_params(pruned) < pruner.report.params_before


def test_original_model_is_untouched(pruned_half):
    name, model, reference, pruner, pruned, target = pruned_half
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)


def test_attention_metadata_matches_weights(pruned_half):
    name, model, reference, pruner, pruned, target = pruned_half
    adapter = get_adapter(pruned)
    for attention in adapter.attentions(pruned):
        inner = attention.inner_features()
        assert attention.num_heads * attention.head_dim == inner == attention.output.in_features
        assert attention.num_heads >= 1


def test_report_layers_describe_the_pruned_model(pruned_half):
    name, model, reference, pruner, pruned, target = pruned_half
    kinds = {w.kind for w in pruner.report.layers}
    assert kinds <= {"heads", "head_dim", "channels", "residual"}
    assert any(w.after < w.before for w in pruner.report.layers)
    heads = {w.name: w.after for w in pruner.report.layers if w.kind == "heads"}
    for attention in get_adapter(pruned).attentions(pruned):
        assert heads[attention.name] == attention.num_heads
