"""Budget policies: "shared" (one ratio for every class) and "allocate" (per-class amounts)."""

from __future__ import annotations

import pytest
import torch

from models import BUILDERS, build
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig, count_macs, count_params


def _calibration(pruner: IsomorphicPruner) -> torch.Tensor:
    size = pruner.adapter.image_size()
    return torch.randn(8, pruner.adapter.num_channels(), size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_allocate_hits_the_macs_target(name):
    model = build(name)
    pruner = IsomorphicPruner(model)
    target = count_macs(model) * 0.5
    pruned = pruner.prune(IsomorphicPruningConfig(target_macs=target, budget_policy="allocate"), _calibration(pruner))
    assert abs(count_macs(pruned) - target) / target <= 0.01


@pytest.mark.parametrize("policy", ["shared", "allocate"])
def test_params_target_is_hit_with_both_policies(policy):
    model = build("deit")
    target = count_params(model) * 0.4
    pruned = IsomorphicPruner(model).prune(
        IsomorphicPruningConfig(target_params=target, budget_policy=policy, importance="magnitude")
    )
    assert abs(count_params(pruned) - target) / target <= 0.01


def test_allocate_gives_classes_different_amounts():
    pruner = IsomorphicPruner(build("vit"))
    pruner.prune(
        IsomorphicPruningConfig(target_macs=count_macs(pruner.model) * 0.5, budget_policy="allocate"),
        _calibration(pruner),
    )
    ratios = {round(c.ratio, 2) for c in pruner.report.classes}
    assert len(ratios) > 1


def test_with_a_single_class_both_policies_give_the_same_model():
    config = dict(grouping="global", prune_heads=False, importance="magnitude", round_to=1)
    target = count_macs(build("vit")) * 0.55
    shared = IsomorphicPruner(build("vit")).prune(IsomorphicPruningConfig(target_macs=target, **config))
    allocated = IsomorphicPruner(build("vit")).prune(
        IsomorphicPruningConfig(target_macs=target, budget_policy="allocate", **config)
    )
    a, b = shared.state_dict(), allocated.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_allocate_is_deterministic_given_the_seed():
    def run():
        pruner = IsomorphicPruner(build("convnext"))
        return pruner.prune(
            IsomorphicPruningConfig(
                target_macs=count_macs(pruner.model) * 0.4, budget_policy="allocate", importance="random", seed=7
            )
        ).state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("policy", ["shared", "allocate"])
def test_report_widths_account_for_the_achieved_macs(policy):
    """Recompute a ViT's MACs by hand from the per-layer widths the report lists."""
    model = build("vit")
    pruner = IsomorphicPruner(model)
    pruner.prune(
        IsomorphicPruningConfig(target_macs=count_macs(model) * 0.5, budget_policy=policy), _calibration(pruner)
    )
    report, config = pruner.report, model.config
    layers = {(w.name, w.kind): w.after for w in report.layers}
    hidden = next(w.after for w in report.layers if w.kind == "residual")
    patches = (config.image_size // config.patch_size) ** 2
    tokens = patches + 1
    macs = patches * hidden * config.num_channels * config.patch_size**2 + hidden * config.num_labels
    for i in range(config.num_hidden_layers):
        inner = layers[(f"vit.layers.{i}.attention", "heads")] * layers[(f"vit.layers.{i}.attention", "head_dim")]
        mlp = layers[(f"vit.layers.{i}.mlp.fc1", "channels")]
        macs += tokens * (4 * hidden * inner + 2 * hidden * mlp) + 2 * tokens * tokens * inner
    assert macs == report.macs_after


@pytest.mark.parametrize("policy", ["shared", "allocate"])
def test_head_ratios_given_by_the_user_are_kept_while_solving(policy):
    model = build("timm_vit")
    pruner = IsomorphicPruner(model)
    pruner.prune(
        IsomorphicPruningConfig(
            target_macs=count_macs(model) * 0.5,
            head_pruning_ratio=0.25,
            head_dim_pruning_ratio=0.0,
            budget_policy=policy,
            importance="magnitude",
        )
    )
    classes = {c.name.split(":")[0]: c for c in pruner.report.classes}
    assert (classes["heads"].before, classes["heads"].after) == (12, 9)
    assert classes["head_dim"].after == classes["head_dim"].before
    assert abs(pruner.report.target_error) <= 0.01
