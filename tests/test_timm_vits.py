"""timm BEiT and EVA-02 beyond the support matrix (tests/test_timm_families.py): what their topology adds.

q / v biases added to a fused qkv follow its kept rows, rotary attentions keep their head-dim pairs, a SwiGLU's gate
and value halves keep the same hidden channels, and a bias table shared by every BEiT block keeps all heads.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch_pruning as tp
from timm.models import beit, eva

from models import IMAGE_SIZE, TIMM_VIT_KWARGS, build, independent_macs, inputs, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.adapters import get_adapter
from optimum_isoprune.checkpoint import load_pruned_model
from optimum_isoprune.counting import count_macs
from optimum_isoprune.isomorphic import collect_groups
from optimum_isoprune.modeling.timm_attention import PrunedBeitAttention

TINY = dict(TIMM_VIT_KWARGS, depth=2)


def _tiny(architecture: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(architecture, pretrained=False, **{**TINY, **overrides}).eval()
    with torch.no_grad():  # timm initialises the q / v biases and bias tables to zero: make them matter
        for name, param in model.named_parameters():
            if name.endswith(("q_bias", "v_bias", "relative_position_bias_table")):
                param.normal_(std=0.5)
    return model


def _heads_only(model: torch.nn.Module, **config) -> torch.nn.Module:
    """Prune heads (and head dims where allowed) only: the residual and MLP widths stay, nothing is refit."""
    defaults = dict(pruning_ratio=0.0, head_pruning_ratio=0.5, importance="magnitude", reconstruction="none")
    return IsomorphicPruner(model).prune(IsomorphicPruningConfig(**{**defaults, **config}))


def _kept_channels(original: torch.nn.Module, pruned: torch.nn.Module) -> list[int]:
    """Original attention channels (head * head_dim + dim) the pruned attention kept, found from the value rows
    (the query rows may carry a folded scale)."""
    width, kept_width = original.qkv.out_features // 3, pruned.qkv.out_features // 3
    values, kept_values = original.qkv.weight[2 * width :], pruned.qkv.weight[2 * kept_width :]
    return [next(j for j in range(width) if torch.equal(row, values[j])) for row in kept_values]


@pytest.mark.parametrize("architecture", ["beit_base_patch16_224", "eva02_tiny_patch14_224"])
def test_qkv_biases_follow_the_kept_rows(architecture):
    model = _tiny(architecture)
    head_dims = {"head_dim_pruning_ratio": 0.5} if architecture.startswith("beit") else {}
    pruned = _heads_only(model, **head_dims)
    masked = copy.deepcopy(model)  # the same network with every removed attention channel zeroed
    narrowed = False
    for block, pruned_block, masked_block in zip(model.blocks, pruned.blocks, masked.blocks):
        attention, kept_attention = block.attn, pruned_block.attn
        kept = _kept_channels(attention, kept_attention)
        narrowed |= len(kept) < attention.qkv.out_features // 3
        fold = attention.scale / kept_attention.scale  # head dims pruned: the original scale is folded into q
        assert torch.equal(kept_attention.v_bias, attention.v_bias[kept])
        assert torch.allclose(kept_attention.q_bias, attention.q_bias[kept] * fold)
        assert torch.equal(kept_attention.k_bias, torch.zeros_like(kept_attention.q_bias))
        width = attention.qkv.out_features // 3
        gone = torch.tensor(sorted(set(range(width)) - set(kept)), dtype=torch.long)
        with torch.no_grad():
            for third in range(3):
                masked_block.attn.qkv.weight[third * width + gone] = 0
            masked_block.attn.q_bias[gone] = 0
            masked_block.attn.v_bias[gone] = 0
            masked_block.attn.proj.weight[:, gone] = 0
    assert narrowed
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.allclose(logits(pruned, x), logits(masked, x), atol=1e-5)


def test_ratio_zero_keeps_the_separate_biases_bit_identical():
    model = build("timm_beit")
    pruned = IsomorphicPruner(model).prune(IsomorphicPruningConfig(pruning_ratio=0.0, importance="magnitude"))
    for block, pruned_block in zip(model.blocks, pruned.blocks):
        assert pruned_block.attn.qkv.bias is None  # the stock layout: biases beside qkv, not in it
        assert torch.equal(pruned_block.attn.q_bias, block.attn.q_bias)
        assert torch.equal(pruned_block.attn.v_bias, block.attn.v_bias)


def test_rope_attentions_keep_their_head_dims():
    model = _tiny("eva02_tiny_patch14_224")
    pruned = IsomorphicPruner(model).prune(
        IsomorphicPruningConfig(pruning_ratio=0.5, head_pruning_ratio=0.5, head_dim_pruning_ratio=0.5)
    )
    assert all(p.attn.head_dim == b.attn.head_dim for p, b in zip(pruned.blocks, model.blocks))
    assert all(p.attn.qkv.out_features == 3 * p.attn.num_heads * p.attn.head_dim for p in pruned.blocks)
    assert any(p.attn.num_heads < b.attn.num_heads for p, b in zip(pruned.blocks, model.blocks))
    # without rotary embeddings the same network prunes head dims
    plain = _tiny("eva02_tiny_patch14_224", use_rot_pos_emb=False)
    pruned = _heads_only(plain, head_pruning_ratio=0.0, head_dim_pruning_ratio=0.5)
    assert all(p.attn.head_dim < b.attn.head_dim for p, b in zip(pruned.blocks, plain.blocks))


def _mlp_groups(model: torch.nn.Module, hidden: int):
    """The MLP hidden-channel groups torch-pruning forms on the copy the pruner traces."""
    adapter = get_adapter(model)
    copy_ = copy.deepcopy(model)
    adapter.make_traceable(copy_)
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    graph = tp.DependencyGraph().build_dependency(
        copy_, example, forward_fn=adapter.forward, verbose=False, **adapter.graph_options(copy_)
    )
    adapter.adjust_graph(graph, copy_)
    names = {module: name for name, module in copy_.named_modules()}
    groups = collect_groups(graph, copy_, adapter.attentions(copy_), adapter.classifiers(copy_))
    return [g for g in groups if ".mlp." in g.name and g.width == hidden], names


@pytest.mark.parametrize("scale_mlp", [False, True], ids=["packed GluMlp", "split SwiGLU with norm"])
def test_swiglu_halves_keep_the_same_hidden_channels(scale_mlp):
    model = _tiny("eva02_tiny_patch14_224", scale_mlp=scale_mlp)
    hidden = model.blocks[0].mlp.fc2.in_features
    groups, names = _mlp_groups(model, hidden)
    assert len(groups) == len(model.blocks)
    for group in groups:
        by_layer = {(names[t.target].rsplit(".", 1)[-1], t.is_out): t for t in group.targets}
        halves = [("fc1_first", True), ("fc1_second", True)] if not scale_mlp else [("fc1_g", True), ("fc1_x", True)]
        for key in [*halves, ("fc2", False)] + ([("norm", True)] if scale_mlp else []):
            target = by_layer[key]  # every hidden channel j is row j of both halves (and of the norm), fc2 input j
            assert sorted(target.idxs.tolist()) == list(range(hidden)), key
            assert torch.equal(torch.as_tensor(target.idxs), torch.as_tensor(target.root_idxs)), key
    pruned = IsomorphicPruner(model).prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude"))
    for block in pruned.blocks:
        mlp = block.mlp
        if scale_mlp:
            assert (
                mlp.fc1_g.out_features == mlp.fc1_x.out_features == mlp.norm.normalized_shape[0] == mlp.fc2.in_features
            )
        else:
            assert mlp.fc1.out_features == 2 * mlp.fc2.in_features
        assert mlp.fc2.in_features < hidden
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert logits(pruned, x).shape == (2, 10)


def test_shared_bias_table_keeps_every_head(tmp_path):
    model = _tiny("beit_base_patch16_224", use_rel_pos_bias=False, use_shared_rel_pos_bias=True)
    pruner = IsomorphicPruner(model)
    pruned = pruner.prune(
        IsomorphicPruningConfig(pruning_ratio=0.5, head_pruning_ratio=0.5, head_dim_pruning_ratio=0.5),
        calibration_dataset=inputs(pruner, batch=8),
    )
    assert (
        pruned.rel_pos_bias.relative_position_bias_table.shape == model.rel_pos_bias.relative_position_bias_table.shape
    )
    assert all(p.attn.num_heads == b.attn.num_heads for p, b in zip(pruned.blocks, model.blocks))
    assert any(p.attn.qkv.out_features < b.attn.qkv.out_features for p, b in zip(pruned.blocks, model.blocks))
    pruner.save_pretrained(tmp_path)
    loaded = load_pruned_model(tmp_path)
    assert all(isinstance(block.attn, PrunedBeitAttention) for block in loaded.blocks)
    x = inputs(pruner)
    assert torch.equal(logits(loaded, x), logits(pruned.eval(), x))


@pytest.mark.parametrize("name", ["timm_beit", "timm_eva02"])
def test_stock_model_is_counted_with_its_qkv(name):
    """The stock forward runs qkv as F.linear on its weight (no module hook): counted in the pruned form (qkv called
    as a module, the same values), it agrees with torch's counter, and the model is of its stock classes again."""
    model = build(name)
    theirs = independent_macs(copy.deepcopy(model), torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    assert count_macs(model) == theirs
    assert all(type(block.attn) in (beit.Attention, eva.EvaAttention) for block in model.blocks)


@pytest.mark.parametrize("name", ["timm_beit", "timm_eva02"])
def test_least_squares_refits_qkv_and_its_biases(name):
    """The user's model runs its attentions in the pruned form while it is reconstruction's reference, so qkv is
    refit like every other layer whose inputs lost channels (the residual width), q / v biases included."""
    model = _tiny({"timm_beit": "beit_base_patch16_224", "timm_eva02": "eva02_tiny_patch14_224"}[name])
    pruner = IsomorphicPruner(model)
    config = dict(target_macs=count_macs(model) * 0.5, importance="magnitude")
    calibration = inputs(pruner, batch=16)
    plain = pruner.prune(IsomorphicPruningConfig(**config, reconstruction="none"), calibration_dataset=calibration)
    refit = pruner.prune(
        IsomorphicPruningConfig(**config, reconstruction="least_squares"), calibration_dataset=calibration
    )
    assert not [layer for layer in pruner.report.reconstruction["skipped_layers"] if layer.endswith("qkv")]
    for block, plain_block, refit_block in zip(model.blocks, plain.blocks, refit.blocks):
        before, after = plain_block.attn, refit_block.attn
        assert after.qkv.in_features < block.attn.qkv.in_features  # a refit target: its inputs lost channels
        assert after.qkv.weight.shape == before.qkv.weight.shape and not torch.equal(
            after.qkv.weight, before.qkv.weight
        )
        assert not torch.equal(after.q_bias, before.q_bias) and not torch.equal(after.v_bias, before.v_bias)
        assert after.qkv.bias is None and torch.equal(after.k_bias, torch.zeros_like(after.q_bias))  # timm's layout
    assert all(type(block.attn) in (beit.Attention, eva.EvaAttention) for block in model.blocks)  # the user's: stock


VARIANTS = {
    "eva02 separate q/k/v": ("eva02_tiny_patch14_224", dict(qkv_fused=False)),
    "eva02 split SwiGLU with norm": ("eva02_tiny_patch14_224", dict(scale_mlp=True)),
    "eva02 without rope": ("eva02_tiny_patch14_224", dict(use_rot_pos_emb=False)),
    "beit absolute positions, no table": ("beit_base_patch16_224", dict(use_abs_pos_emb=True, use_rel_pos_bias=False)),
    "beit without qkv biases": ("beit_base_patch16_224", dict(qkv_bias=False)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_prune_to_half_and_reload_bit_identical(variant, tmp_path):
    architecture, overrides = VARIANTS[variant]
    model = _tiny(architecture, **overrides)
    pruner = IsomorphicPruner(model)
    x = inputs(pruner)
    unpruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.0, importance="magnitude"))
    assert torch.equal(logits(unpruned, x), logits(model, x))
    target = count_macs(model) * 0.5
    pruned = pruner.prune(IsomorphicPruningConfig(target_macs=target), calibration_dataset=inputs(pruner, batch=8))
    assert abs(count_macs(pruned) - target) / target <= 0.01
    pruner.save_pretrained(tmp_path)
    assert torch.equal(logits(load_pruned_model(tmp_path), x), logits(pruned.eval(), x))


@pytest.mark.parametrize("name", ["timm_beit", "timm_eva02"])
def test_search_budget_policy_reaches_half(name):
    """The search refits candidates on the copy in its traceable form (qkv carrying the biases, SwiGLU halves):
    layers the original model never calls, or does not have, are left out of the refit."""
    model = build(name)
    pruner = IsomorphicPruner(model)
    target = count_macs(model) * 0.5
    config = IsomorphicPruningConfig(target_macs=target, budget_policy="search", search_candidates=4)
    pruned = pruner.prune(config, calibration_dataset=inputs(pruner, batch=16))
    assert abs(count_macs(pruned) - target) / target <= 0.01
