"""Swin V2 (transformers and timm) beyond the support matrix: per-head logit scales and position-bias MLP rows, the
V2 PatchMerging order, timm's separate qkv biases and its attention at pruned widths, checkpoints."""

from __future__ import annotations

import copy
import pickle

import pytest
import timm
import torch

from models import SWIN_KWARGS, build, independent_macs, inputs, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.adapters import get_adapter
from optimum_isoprune.adapters.swin import PatchMergingPruner, Swinv2TimmAdapter, Swinv2TransformersAdapter
from optimum_isoprune.checkpoint import load_pruned_model
from optimum_isoprune.counting import count_macs
from optimum_isoprune.modeling.timm_attention import PrunedWindowAttentionV2, use_pruned_forms

SWINV2 = ["hf_swinv2", "timm_swinv2"]


def _query_rows(attention) -> torch.Tensor:
    q = attention.projections[0]
    return q.weight[: q.out_features // attention.fused]


def _heads_only(name: str) -> tuple[IsomorphicPruner, torch.nn.Module]:
    """The pruner of the model and the copy that lost half of its heads (ranked by magnitude), nothing else, and no
    refit."""
    pruner = IsomorphicPruner(build(name))
    config = IsomorphicPruningConfig(
        pruning_ratio=0.0, head_pruning_ratio=0.5, importance="magnitude", reconstruction="none"
    )
    return pruner, pruner.prune(config)


def _kept_heads(before, after) -> list[int]:
    rows, new_rows = _query_rows(before).view(before.num_heads, -1), _query_rows(after).view(after.num_heads, -1)
    kept = [h for h in range(before.num_heads) if any(torch.equal(rows[h], r) for r in new_rows)]
    assert len(kept) == after.num_heads
    return kept


@pytest.mark.parametrize("name", SWINV2)
def test_adapter_finds_heads_logit_scales_and_position_bias_mlps(name):
    adapter = get_adapter(build(name))
    assert isinstance(adapter, Swinv2TransformersAdapter if name.startswith("hf") else Swinv2TimmAdapter)
    attentions = adapter.attentions(adapter.model)
    assert [a.num_heads for a in attentions] == [2, 2, 4, 4]
    assert {a.head_dim for a in attentions} == {8}
    for attention in attentions:
        scale, mlp = attention.head_targets()
        assert scale.shape == (attention.num_heads, 1, 1)
        assert isinstance(mlp, torch.nn.Linear) and mlp.out_features == attention.num_heads


@pytest.mark.parametrize("name", SWINV2)
def test_windowed_cosine_attention_is_counted_like_torch(name):
    model = build(name)
    assert count_macs(model) == independent_macs(model, inputs(IsomorphicPruner(model)))


@pytest.mark.parametrize("name", SWINV2)
def test_logit_scales_and_position_bias_rows_follow_the_kept_heads(name):
    pruner, pruned = _heads_only(name)
    model = pruner.model
    pairs = list(zip(get_adapter(model).attentions(model), get_adapter(pruned).attentions(pruned)))
    assert any(after.num_heads < before.num_heads for before, after in pairs)
    for before, after in pairs:
        kept = _kept_heads(before, after)
        (scale, mlp), (new_scale, new_mlp) = before.head_targets(), after.head_targets()
        assert torch.equal(new_scale, scale[kept])
        assert torch.equal(new_mlp.weight, mlp.weight[kept]) and new_mlp.out_features == len(kept)
    assert count_macs(pruned) < count_macs(model)
    assert count_macs(pruned) == independent_macs(pruned, inputs(pruner))  # the MLP's MACs shrank with the heads


@pytest.mark.parametrize("name", SWINV2)
def test_head_pruned_model_equals_the_model_with_those_heads_masked(name):
    """Heads of Swin V2 are independent (own cosine norm, logit scale and position bias): removing some equals zeroing
    their inputs to the output projection, with every bias and scale of the kept heads where it belongs."""
    pruner, pruned = _heads_only(name)
    model, masked = pruner.model, build(name)
    for before, attention in zip(get_adapter(model).attentions(model), get_adapter(masked).attentions(masked)):
        after = next(a for a in get_adapter(pruned).attentions(pruned) if a.name == before.name)
        gone = [h for h in range(before.num_heads) if h not in _kept_heads(before, after)]
        with torch.no_grad():
            columns = attention.output.weight.view(attention.output.out_features, before.num_heads, -1)
            columns[:, gone] = 0
    x = inputs(pruner)
    torch.testing.assert_close(logits(pruned, x), logits(masked, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SWINV2)
def test_head_dims_are_pruned(name):
    pruner = IsomorphicPruner(build(name))
    pruned = pruner.prune(
        IsomorphicPruningConfig(pruning_ratio=0.0, head_dim_pruning_ratio=0.5, round_to=1, importance="magnitude")
    )
    attentions = get_adapter(pruned).attentions(pruned)
    assert any(a.head_dim < 8 for a in attentions) and [a.num_heads for a in attentions] == [2, 2, 4, 4]
    for attention in attentions:
        assert attention.output.in_features == attention.num_heads * attention.head_dim
    assert torch.isfinite(logits(pruned, inputs(pruner))).all()
    assert count_macs(pruned) == independent_macs(pruned, inputs(pruner))


def test_timm_qkv_biases_follow_the_kept_heads_and_are_split_back():
    pruner, pruned = _heads_only("timm_swinv2")
    model = pruner.model
    pairs = list(zip(get_adapter(model).attentions(model), get_adapter(pruned).attentions(pruned)))
    assert any(after.num_heads < before.num_heads for before, after in pairs)
    for before, after in pairs:
        kept, stock, module = _kept_heads(before, after), before.module, after.module
        assert module.qkv.bias is None and torch.equal(module.k_bias, torch.zeros(after.num_heads * after.head_dim))
        for name in ("q_bias", "v_bias"):
            new, old = getattr(module, name), getattr(stock, name)
            assert torch.equal(new.view(after.num_heads, -1), old.view(before.num_heads, -1)[kept])
    logits(pruned, inputs(pruner)).sum().backward()
    assert all(p.grad is not None for p in pruned.parameters())


def test_timm_pruned_attention_form_is_timm_s_own_bit_for_bit():
    model = build("timm_swinv2")
    attention = get_adapter(model).attentions(model)[2].module
    pruned_form = use_pruned_forms(copy.deepcopy(attention))
    assert type(pruned_form) is PrunedWindowAttentionV2
    x = torch.randn(4, 16, attention.qkv.in_features, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(4, 16, 16).masked_fill(torch.rand(4, 16, 16) > 0.7, -100.0)
    for m in (None, mask):
        assert torch.equal(pruned_form(x, m), attention(x, m))


def test_timm_pruned_model_deep_copies_and_pickles():
    model = build("timm_swinv2")
    pruner = IsomorphicPruner(model)
    pruned = pruner.prune(IsomorphicPruningConfig(target_macs=count_macs(model) * 0.5))
    attentions = get_adapter(pruned).attentions(pruned)
    assert all(type(a.module) is PrunedWindowAttentionV2 and "forward" not in vars(a.module) for a in attentions)
    assert any(a.num_heads * a.head_dim != a.module.proj.out_features for a in attentions)  # timm's reshape would fail
    stock = timm.models.swin_transformer_v2.WindowAttention  # the user's model ran in the pruned form only while used
    assert all(type(a.module) is stock for a in get_adapter(model).attentions(model))
    x = inputs(pruner)
    expected = logits(pruned.eval(), x)
    for clone in (copy.deepcopy(pruned), pickle.loads(pickle.dumps(pruned))):
        assert torch.equal(logits(clone, x), expected)


def test_timm_ratio_zero_restores_timm_s_parameters():
    model = build("timm_swinv2")
    pruner = IsomorphicPruner(model)
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.0, importance="magnitude"))
    assert pruned.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in pruned.state_dict().items())
    assert torch.equal(logits(pruned, inputs(pruner)), logits(model, inputs(pruner)))


def test_v2_patch_merging_normalises_after_the_reduction():
    merge = timm.models.swin_transformer_v2.PatchMerging(dim=4, out_dim=6)
    with torch.no_grad():
        merge.reduction.weight.copy_(torch.arange(96.0).view(6, 16))
    PatchMergingPruner()(merge, [1, 3], to_output=False)
    assert merge.reduction.weight[0].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0]
    assert merge.reduction.in_features == 8 and merge.dim == 2 and merge.norm.normalized_shape == (6,)
    PatchMergingPruner()(merge, [0], to_output=True)
    assert merge.reduction.out_features == 5 and merge.out_dim == 5 and merge.norm.normalized_shape == (5,)
    assert merge(torch.randn(1, 4, 4, 2)).shape == (1, 2, 2, 5)


@pytest.mark.parametrize("name", SWINV2)
def test_stage_widths_are_pruned_through_v2_patch_merging(name):
    model = build(name)
    pruner = IsomorphicPruner(model)
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude"))
    residual = [w for w in pruner.report.layers if w.kind == "residual"]
    assert len(residual) == 2 and all(w.after < w.before for w in residual)
    merge = next(m for m in pruned.modules() if hasattr(m, "reduction") and hasattr(m, "norm"))
    stage0, stage1 = (min(w.after for w in residual if w.before == width) for width in (16, 32))
    assert merge.reduction.in_features == 4 * stage0
    assert merge.norm.normalized_shape[0] == merge.reduction.out_features == stage1
    logits(pruned, inputs(pruner))


def test_hf_checkpoint_records_the_kept_heads():
    """Save -> load, Auto classes and pipeline() are the matrix's (tests/test_modeling.py "hf_swinv2")."""
    model = build("hf_swinv2")
    pruner = IsomorphicPruner(model)
    pruned = pruner.prune(
        IsomorphicPruningConfig(target_macs=count_macs(model) * 0.5), calibration_dataset=inputs(pruner, 8)
    )
    assert pruned.config.layer_num_heads == [a.num_heads for a in get_adapter(pruned).attentions(pruned)]
    assert min(pruned.config.layer_num_heads) < max(SWIN_KWARGS["num_heads"])


def test_timm_checkpoint_reloads_bit_identical_with_pruned_heads(tmp_path):
    model = build("timm_swinv2")
    pruner = IsomorphicPruner(model)
    pruned = pruner.prune(
        IsomorphicPruningConfig(target_macs=count_macs(model) * 0.5), calibration_dataset=inputs(pruner, 8)
    )
    attentions = get_adapter(pruned).attentions(pruned)
    assert any(a.num_heads * a.head_dim != a.module.proj.out_features for a in attentions)  # timm's reshape would fail
    pruner.save_pretrained(tmp_path)
    loaded = load_pruned_model(tmp_path)
    assert all(type(a.module) is PrunedWindowAttentionV2 for a in get_adapter(loaded).attentions(loaded))
    x = inputs(pruner)
    assert torch.equal(logits(loaded, x), logits(pruned.eval(), x))
