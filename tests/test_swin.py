"""Swin Transformer (transformers and timm) beyond the support matrix: per-head bias tables, PatchMerging, windows."""

from __future__ import annotations

import pytest
import timm
import torch

from models import IMAGE_SIZE, build, independent_macs, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.adapters import get_adapter
from optimum_isoprune.adapters.swin import PatchMergingPruner, SwinTimmAdapter, SwinTransformersAdapter
from optimum_isoprune.counting import count_macs

SWIN = ["hf_swin", "timm_swin"]


def inputs(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def _query_rows(attention) -> torch.Tensor:
    q = attention.projections[0]
    return q.weight[: q.out_features // attention.fused]


@pytest.mark.parametrize("name", SWIN)
def test_adapter_is_found(name):
    adapter = get_adapter(build(name))
    assert isinstance(adapter, SwinTransformersAdapter if name.startswith("hf") else SwinTimmAdapter)
    attentions = adapter.attentions(adapter.model)
    assert [a.num_heads for a in attentions] == [2, 2, 4, 4]
    assert {a.head_dim for a in attentions} == {8}


@pytest.mark.parametrize("name", SWIN)
def test_windowed_attention_is_counted_per_window(name):
    """Our analytic count equals torch's FlopCounterMode: attention costs tokens x window tokens, not tokens^2."""
    model = build(name)
    ours = count_macs(model)
    assert ours == independent_macs(build(name), inputs())


@pytest.fixture(scope="module", params=SWIN)
def pruned_half(request):
    model = build(request.param)
    pruner = IsomorphicPruner(model)
    pruned = pruner.prune(IsomorphicPruningConfig(target_macs=count_macs(model) * 0.5), calibration_dataset=inputs(8))
    return pruner, pruned


def test_attention_metadata_and_bias_tables_match_weights(pruned_half):
    pruner, pruned = pruned_half
    attentions = get_adapter(pruned).attentions(pruned)
    assert sum(a.num_heads for a in attentions) < 12  # some heads went
    heads = {w.name: w.after for w in pruner.report.layers if w.kind == "heads"}
    for attention in attentions:
        inner = attention.projections[0].out_features // attention.fused
        assert attention.num_heads * attention.head_dim == inner == attention.output.in_features
        (table,) = attention.head_parameters()
        assert table.shape == (49, attention.num_heads)  # (2 * window - 1)^2 relative positions
        assert heads[attention.name] == attention.num_heads


def test_stage_widths_are_pruned_through_patch_merging(pruned_half):
    pruner, pruned = pruned_half
    residual = [w for w in pruner.report.layers if w.kind == "residual"]
    assert len(residual) == 2 and any(w.after < w.before for w in residual)
    merge = next(m for m in pruned.modules() if hasattr(m, "reduction") and hasattr(m, "norm"))
    stage0 = min(w.after for w in residual if w.before == 16)
    assert merge.norm.normalized_shape[0] == merge.reduction.in_features == 4 * stage0


@pytest.mark.parametrize("name", SWIN)
def test_bias_table_keeps_the_columns_of_the_kept_heads(name):
    model = build(name)
    pruner = IsomorphicPruner(model)
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.0, head_pruning_ratio=0.5, importance="magnitude"))
    pairs = list(zip(get_adapter(model).attentions(model), get_adapter(pruned).attentions(pruned)))
    assert 6 <= sum(after.num_heads for _, after in pairs) < 12  # ranked across layers; min_heads may keep a few
    assert any(after.num_heads < before.num_heads for before, after in pairs)
    for before, after in pairs:
        rows, new_rows = _query_rows(before).view(before.num_heads, -1), _query_rows(after).view(after.num_heads, -1)
        kept = [h for h in range(before.num_heads) if any(torch.equal(rows[h], r) for r in new_rows)]
        assert len(kept) == after.num_heads
        assert torch.equal(after.head_parameters()[0], before.head_parameters()[0][:, kept])


@pytest.mark.parametrize("name", SWIN)
@pytest.mark.parametrize("min_heads", [1, 2])
def test_min_heads_is_kept_in_every_layer(name, min_heads):
    pruner = IsomorphicPruner(build(name))
    pruned = pruner.prune(
        IsomorphicPruningConfig(pruning_ratio=0.5, head_pruning_ratio=0.95, min_heads=min_heads, importance="magnitude")
    )
    heads = [a.num_heads for a in get_adapter(pruned).attentions(pruned)]
    assert min(heads) == min_heads
    logits(pruned, inputs()).sum()  # still runs


def test_patch_merging_pruner_maps_each_channel_to_its_four_copies():
    merge = timm.models.swin_transformer.PatchMerging(dim=4, out_dim=6)
    with torch.no_grad():
        merge.norm.weight.copy_(torch.arange(16.0))
    PatchMergingPruner()(merge, [1, 3], to_output=False)
    assert merge.norm.weight.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0]
    assert merge.reduction.in_features == 8 and merge.dim == 2
    PatchMergingPruner()(merge, [0], to_output=True)
    assert merge.reduction.out_features == 5 and merge.out_dim == 5
    assert merge(torch.randn(1, 4, 4, 2)).shape == (1, 2, 2, 5)


@pytest.mark.parametrize("name", SWIN)
def test_pruned_swin_saves_and_loads_bit_identical(name, tmp_path):
    from optimum_isoprune.checkpoint import load_pruned_model

    pruner = IsomorphicPruner(build(name))
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude"))
    pruner.save_pretrained(tmp_path)
    x = inputs()
    assert torch.equal(logits(load_pruned_model(tmp_path), x), logits(pruned, x))


@pytest.mark.slow
def test_full_swin_tiny_shape_halves_macs():
    """timm swin_tiny_patch4_window7_224 shapes (random weights, 224 px): 50% of the MACs."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    pruner = IsomorphicPruner(model)
    before = count_macs(model)
    pruned = pruner.prune(IsomorphicPruningConfig(target_macs=before * 0.5, importance="magnitude"))
    report = pruner.report
    print(
        f"\nswin_tiny 224px: MACs {report.macs_before / 1e9:.3f} G -> {report.macs_after / 1e9:.3f} G, "
        f"params {report.params_before / 1e6:.2f} M -> {report.params_after / 1e6:.2f} M"
    )
    print(report.summary())
    assert abs(report.macs_after - before * 0.5) / (before * 0.5) <= 0.01
    assert pruned(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
