"""Adapter details the support matrix does not show on its own."""

from __future__ import annotations

import pytest
import torch

from models import build, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.adapters import ModelAdapter, ModelIO, adapter_for


@pytest.mark.parametrize("name", ["timm_vit", "timm_swin"])
def test_timm_fused_and_eager_attention_agree_after_head_dim_pruning(name):
    """timm's fused kernel scales by 1/sqrt(head_dim) while its eager path uses `scale`: after head dims are
    removed both must still compute the original softmax temperature (folded into the query weights)."""
    model = build(name)
    pruner = IsomorphicPruner(model)
    pruned = pruner.prune(
        IsomorphicPruningConfig(
            pruning_ratio=0.5, importance="magnitude", reconstruction="none", prune_heads=False, round_to=1
        )
    )
    assert pruner.report.head_dim_pruning_ratio > 0
    size = pruner.adapter.image_size()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    attentions = [m for m in pruned.modules() if hasattr(m, "fused_attn")]
    outputs = []
    with torch.no_grad():
        for fused in (True, False):
            for module in attentions:
                module.fused_attn = fused
            outputs.append(logits(pruned, x))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)


def test_input_spec_reads_transformers_and_timm():
    import timm
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=28,
            patch_size=7,
            num_channels=1,
        )
    )
    assert adapter_for(vit).input_spec() == (28, 1)
    deit = timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=False,
        img_size=28,
        patch_size=7,
        in_chans=1,
        embed_dim=32,
        depth=1,
        num_heads=2,
    )
    assert adapter_for(deit).input_spec() == (28, 1)
    resnet = timm.create_model("resnet18", pretrained=False, in_chans=1)
    assert adapter_for(resnet).input_spec() == (None, 1)  # CNNs take any size


def test_adapter_for_falls_back_to_model_io_for_models_the_pruner_does_not_know():
    from torch import nn

    unknown = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    io = adapter_for(unknown)
    assert type(io) is ModelIO
    assert io.input_spec() == (None, 1) and io.num_labels() is None and io.label_names() is None
    assert io.predict(torch.zeros(2, 1, 8, 8)).shape == (2, 3)  # called positionally: no pixel_values keyword
    vit = build("vit")
    adapter = adapter_for(vit)
    assert isinstance(adapter, ModelAdapter) and adapter.accepts_keyword("pixel_values")
    x = torch.randn(2, 3, adapter.image_size(), adapter.image_size())
    with torch.no_grad():
        torch.testing.assert_close(adapter.predict(x), vit(pixel_values=x).logits)


def test_no_supported_model_type_is_listed_as_a_gap():
    """A family the adapters accept must not be refused with a stale "nearest family" explanation."""
    from optimum_isoprune.adapters import ADAPTERS
    from optimum_isoprune.adapters.nearest import KNOWN_GAPS

    accepted = {t for adapter in ADAPTERS for t in getattr(adapter, "model_types", {})}
    assert {"dinov2", "clip", "siglip"} <= accepted and not accepted & set(KNOWN_GAPS)
