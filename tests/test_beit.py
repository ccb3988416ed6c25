"""BEiT and data2vec-vision (transformers): what they add to a ViT. The support matrix holds both bias-table settings
to its guarantees (tests/models.py BUILDERS "beit" and "data2vec_vision": a table per layer, "beit_shared": one table
shared by every layer)."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import (
    AutoModelForImageClassification,
    BeitConfig,
    BeitForImageClassification,
    Data2VecVisionConfig,
    Data2VecVisionForImageClassification,
)

from models import BEIT_KWARGS, build, inputs, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.counting import count_macs


def _half(model):
    pruner = IsomorphicPruner(model)
    config = IsomorphicPruningConfig(target_macs=count_macs(model) * 0.5, importance="magnitude")
    return pruner, pruner.prune(config)


@pytest.mark.parametrize("name", ["beit", "beit_shared"])
def test_each_layer_keeps_its_own_heads_with_their_bias_columns(name):
    model = build(name)
    pruner, pruned = _half(model)
    heads = [layer.attention.num_attention_heads for layer in pruned.beit.layers]
    assert min(heads) < model.config.num_attention_heads
    x = inputs(pruner)
    for layer in pruned.beit.layers:
        table = layer.relative_position_bias.relative_position_bias_table
        assert table.shape[-1] == layer.attention.num_attention_heads
        assert layer.lambda_1.shape == layer.lambda_2.shape == pruned.beit.embeddings.cls_token.shape[-1:]
    assert pruned.beit.shared_position_bias is None and not pruned.config.use_shared_relative_position_bias
    assert logits(pruned, x).shape == logits(model, x).shape


def test_shared_table_is_copied_into_each_layer_of_the_copy_only():
    model = build("beit_shared")
    pruner = IsomorphicPruner(model)
    x = inputs(pruner)
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.0, importance="magnitude"))
    assert torch.equal(logits(pruned, x), logits(model, x))
    shared = model.beit.shared_position_bias.relative_position_bias_table
    for layer in pruned.beit.layers:
        assert torch.equal(layer.relative_position_bias.relative_position_bias_table, shared)
    # the user's model is untouched: still one shared table, no per-layer ones
    assert model.config.use_shared_relative_position_bias and not model.config.use_relative_position_bias
    assert all(layer.relative_position_bias is None for layer in model.beit.layers)


def test_shared_and_per_layer_tables_add_up():
    torch.manual_seed(0)
    model = BeitForImageClassification(
        BeitConfig(use_shared_relative_position_bias=True, use_relative_position_bias=True, **BEIT_KWARGS)
    ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                param.normal_(std=0.5)
    pruner = IsomorphicPruner(model)
    x = inputs(pruner)
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.0, importance="magnitude"))
    torch.testing.assert_close(logits(pruned, x), logits(model, x))


def test_without_bias_tables_and_with_taylor_importance(tmp_path):
    """No relative position bias at all (ViT-like attention); Taylor importance sees the tables' gradients again."""
    torch.manual_seed(0)
    model = BeitForImageClassification(BeitConfig(**BEIT_KWARGS)).eval()
    pruner = IsomorphicPruner(model)
    x = inputs(pruner, batch=8)
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.5), calibration_dataset=x)
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded, x), logits(pruned.eval(), x))


def test_bias_tables_train_after_pruning():
    _, pruned = _half(build("beit"))
    pruned.train()
    logits(pruned, torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(
        layer.relative_position_bias.relative_position_bias_table.grad is not None for layer in pruned.beit.layers
    )


def test_data2vec_vision_sdpa_with_a_shared_table(tmp_path):
    """data2vec-vision as transformers builds it by default (SDPA self-attention class) with a shared bias table:
    traced through its eager forward, pruned per layer, and saved and reloaded exactly."""
    torch.manual_seed(0)
    config = Data2VecVisionConfig(use_shared_relative_position_bias=True, **BEIT_KWARGS)
    model = Data2VecVisionForImageClassification(config).eval()
    with torch.no_grad():
        model.data2vec_vision.encoder.relative_position_bias.relative_position_bias_table.normal_(std=0.5)
    assert type(model.data2vec_vision.encoder.layer[0].attention.attention).__name__.endswith("SdpaSelfAttention")
    pruner = IsomorphicPruner(model)
    x = inputs(pruner)
    same = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.0, importance="magnitude"))
    torch.testing.assert_close(logits(same, x), logits(model, x))
    pruner, pruned = _half(model)
    attentions = [layer.attention.attention for layer in pruned.data2vec_vision.encoder.layer]
    assert type(attentions[0]).__name__.endswith("SdpaSelfAttention") and "forward" not in vars(attentions[0])
    for attention in attentions:
        table = attention.relative_position_bias.relative_position_bias_table
        assert table.shape[-1] == attention.num_attention_heads
        assert attention.all_head_size == attention.num_attention_heads * attention.attention_head_size
    assert abs(count_macs(pruned) - pruner.report.macs_before * 0.5) <= 0.01 * pruner.report.macs_before * 0.5
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, x), logits(pruned, x))


_BEIT_TO_DATA2VEC = (
    (r"^beit\.layers\.", "data2vec_vision.encoder.layer."),
    (r"^beit\.", "data2vec_vision."),
    (r"attention\.(q|k|v)_proj", lambda m: "attention.attention." + {"q": "query", "k": "key", "v": "value"}[m[1]]),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"\.mlp\.fc1", ".intermediate.dense"),
    (r"\.mlp\.fc2", ".output.dense"),
    (r"\.relative_position_bias\.", ".attention.attention.relative_position_bias."),
)


def test_data2vec_vision_prunes_head_dims_exactly_like_beit():
    """The same weights in both module layouts prune to the same network: data2vec-vision's scale, recomputed from
    the pruned head size, is folded back into its queries."""
    beit = build("beit")
    with torch.no_grad():  # sharp attention, so that the scale matters
        for layer in beit.beit.layers:
            layer.attention.q_proj.weight.mul_(20)
            layer.attention.k_proj.weight.mul_(20)
    data2vec = build("data2vec_vision")
    state = {}
    for key, value in beit.state_dict().items():
        for pattern, replacement in _BEIT_TO_DATA2VEC:
            key = re.sub(pattern, replacement, key)
        state[key] = value
    data2vec.load_state_dict(state, strict=True)
    config = IsomorphicPruningConfig(
        pruning_ratio=0.25, head_pruning_ratio=0.25, head_dim_pruning_ratio=0.25, round_to=1, importance="magnitude"
    )
    pruned_beit = IsomorphicPruner(beit).prune(config)
    pruned_data2vec = IsomorphicPruner(data2vec).prune(config)
    dims = [layer.attention.attention.attention_head_size for layer in pruned_data2vec.data2vec_vision.encoder.layer]
    assert dims == [layer.attention.head_dim for layer in pruned_beit.beit.layers] and max(dims) < 16  # of 16
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(pruned_data2vec, x), logits(pruned_beit, x))
