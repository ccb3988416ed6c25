"""Adapter details the support matrix does not show on its own."""

from __future__ import annotations

import pytest
import torch

from models import build, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig


@pytest.mark.parametrize("name", ["timm_vit", "timm_swin"])
def test_timm_fused_and_eager_attention_agree_after_head_dim_pruning(name):
    """timm's fused kernel scales by 1/sqrt(head_dim) while its eager path uses `scale`: after head dims are
    removed both must still compute the original softmax temperature (folded into the query weights)."""
    model = build(name)
    pruner = IsomorphicPruner(model)
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude", reconstruction="none",
                                                  prune_heads=False, round_to=1))
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
