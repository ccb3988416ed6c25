"""transformers RegNet and EfficientNet: what the support matrix rows ("regnet", "regnet_x", "efficientnet" in
tests/models.py) do not show: the recorded widths, grouped convs keeping their group count, and RegNet's X layers (no SE)."""

from __future__ import annotations

from torch import nn

from models import build, inputs
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.counting import count_macs


def _half(model: nn.Module) -> tuple[IsomorphicPruner, nn.Module, float]:
    pruner = IsomorphicPruner(model)
    target = count_macs(model) * 0.5
    pruned = pruner.prune(IsomorphicPruningConfig(target_macs=target), calibration_dataset=inputs(pruner, batch=8))
    return pruner, pruned, target


def _grouped_convs(model: nn.Module) -> dict[str, int]:
    return {n: m.groups for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}


def test_regnet_summary_fields_and_conv_groups():
    model = build("regnet")
    pruner, pruned, target = _half(model)
    config = pruned.config
    stages = pruned.regnet.encoder.stages
    assert config.pruned_embedding_size == pruned.regnet.embedder.embedder.convolution.out_channels
    assert config.stage_hidden_sizes == [s.layers[-1].layer[-1].convolution.out_channels for s in stages]
    assert config.stage_block_widths == [
        [[b.layer[0].convolution.out_channels, b.layer[1].convolution.out_channels] for b in s.layers] for s in stages
    ]
    assert config.stage_block_squeeze_widths == [
        [b.layer[2].attention[0].out_channels for b in s.layers] for s in stages
    ]
    assert _grouped_convs(pruned) == _grouped_convs(model) != {}
    stock_widths = [[[b.layer[0].convolution.out_channels] * 2 for b in s.layers] for s in model.regnet.encoder.stages]
    assert config.stage_block_widths != stock_widths


def test_efficientnet_summary_fields_match_the_modules():
    model = build("efficientnet")
    pruner, pruned, target = _half(model)
    config, blocks = pruned.config, pruned.efficientnet.encoder.blocks
    assert config.block_expanded_channels == [b.depthwise_conv.depthwise_conv.out_channels for b in blocks]
    assert config.block_squeeze_channels == [b.squeeze_excite.reduce.out_channels for b in blocks]
    assert config.block_out_channels == [b.projection.project_conv.out_channels for b in blocks]
    assert (
        config.pruned_hidden_dim == pruned.efficientnet.encoder.top_conv.out_channels == pruned.classifier.in_features
    )
    assert config.pruned_hidden_dim < config.hidden_dim  # the stock field still describes the unpruned model
    for block in blocks:  # depthwise convs stay depthwise
        conv = block.depthwise_conv.depthwise_conv
        assert conv.groups == conv.in_channels == conv.out_channels


def test_regnet_x_layers_have_no_squeeze_excitation_and_keep_their_conv_groups():
    """The matrix holds the "regnet_x" row to its guarantees; this is what X layers (no SE) change."""
    model = build("regnet_x")
    pruned = _half(model)[1]
    assert pruned.config.stage_block_squeeze_widths == [[], []]
    assert _grouped_convs(pruned) == _grouped_convs(model) != {}
