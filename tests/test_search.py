"""budget_policy='search': masks match surgery, the search never loses to its starts, targets hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import optimum_isoprune.pruner as pruner_module
from models import BUILDERS, build, logits
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.counting import count_macs
from optimum_isoprune.errors import CalibrationDataError
from optimum_isoprune.search import ChannelMasks


def _images(pruner: IsomorphicPruner, count: int, seed: int = 1) -> torch.Tensor:
    size = pruner.adapter.image_size()
    return torch.randn(count, pruner.adapter.num_channels(), size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "name,keep_residual", [("vit", True), ("deit_teacher", True), ("resnet", False), ("timm_vit", True)]
)
def test_masks_compute_what_surgery_computes(monkeypatch, name, keep_residual):
    """Masked channels on the unpruned model give the pruned model's logits (a residual under LayerNorm is
    the documented approximation, so those rows keep their residual whole)."""
    model = build(name)
    pruner = IsomorphicPruner(model)
    x = _images(pruner, 4)
    masked = {}
    real_apply = pruner_module.apply_plan

    def apply_plan(graph, plan):
        if keep_residual:
            plan.removed = {g: (i[:0] if g.kind == "residual" else i) for g, i in plan.removed.items()}
        masks = ChannelMasks(list(plan.removed))
        masks.set_plan(plan)
        with torch.no_grad(), masks.applied():
            masked["logits"] = pruner.adapter.logits(graph.model, x)
        return real_apply(graph, plan)

    monkeypatch.setattr(pruner_module, "apply_plan", apply_plan)
    pruned = pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude", reconstruction="none"))
    with torch.no_grad():
        torch.testing.assert_close(logits(pruned, x), masked["logits"], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(logits(model, x), masked["logits"], atol=1e-3)  # something was removed


@pytest.fixture(
    scope="module", params=[("vit", 2), ("convnext", 2), ("vit", None)], ids=lambda p: f"{p[0]}-finalists{p[1]}"
)
def searched(request):
    name, finalists = request.param
    model = build(name)
    pruner = IsomorphicPruner(model)
    x = _images(pruner, 48)
    config = IsomorphicPruningConfig(
        target_macs=0.5 * count_macs(model),
        budget_policy="search",
        search_candidates=8,
        search_finalists=finalists,
        calibration_batch_size=16,
        num_calibration_batches=2,
        search_batches=1,
    )
    pruned = pruner.prune(config, calibration_dataset=x)
    return model, pruner, pruned, config, x


def test_search_never_scores_worse_than_its_starts(searched):
    model, pruner, pruned, config, x = searched
    search = pruner.report.search
    assert set(search["start_scores"]) == {"shared", "global"}
    assert search["chosen_score"] <= min(search["start_scores"].values())
    assert 2 <= search["candidates"] <= config.search_candidates
    # fewer finalists than candidates: the starts and the finalists are rescored after reconstruction
    cheap = config.search_finalists is not None and config.search_finalists < config.search_candidates
    tried = search["candidates"] - 2  # candidates beyond the two starts
    assert search["rescored"] == (2 + min(config.search_finalists, tried) if cheap else 0)
    assert abs(pruner.report.macs_after - config.target_macs) / config.target_macs <= 0.01
    assert "split: searched over" in pruner.report.summary()


def test_rescored_starts_score_as_when_every_candidate_is_reconstructed():
    """The cheap ranking changes which candidates are tried, not how a rescored split is scored."""
    model = build("vit")
    x = _images(IsomorphicPruner(model), 48)
    starts = []
    for finalists in (0, None):
        pruner = IsomorphicPruner(model)
        pruner.prune(
            IsomorphicPruningConfig(
                target_macs=0.5 * count_macs(model),
                budget_policy="search",
                search_candidates=8,
                search_finalists=finalists,
                search_batches=1,
                calibration_batch_size=16,
                num_calibration_batches=2,
            ),
            calibration_dataset=x,
        )
        starts.append(pruner.report.search["start_scores"])
    assert starts[0].keys() == starts[1].keys()
    for label in starts[0]:
        assert starts[0][label] == pytest.approx(starts[1][label], rel=1e-6)


def test_search_is_deterministic_given_the_seed(searched):
    model, pruner, pruned, config, x = searched
    again = IsomorphicPruner(model).prune(config, calibration_dataset=x)
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_search_hits_the_target_on_every_row(name):
    model = build(name)
    pruner = IsomorphicPruner(model)
    target = 0.5 * count_macs(model)
    pruned = pruner.prune(
        IsomorphicPruningConfig(
            target_macs=target,
            budget_policy="search",
            search_candidates=4,
            reconstruction="none",
            importance="magnitude",
            calibration_batch_size=4,
            num_calibration_batches=1,
        ),
        calibration_dataset=_images(pruner, 8),
    )
    assert abs(count_macs(pruned) - target) / target <= 0.01
    assert pruner.report.search["chosen_score"] <= min(pruner.report.search["start_scores"].values())


def test_with_a_single_class_search_equals_shared():
    model = build("vit")
    x = _images(IsomorphicPruner(model), 32)
    results = {}
    for policy in ("shared", "search"):
        pruner = IsomorphicPruner(model)
        config = IsomorphicPruningConfig(
            target_macs=0.7 * count_macs(model),
            budget_policy=policy,
            prune_heads=False,
            prune_head_dims=False,
            ignored_modules=["patch_embeddings"],
            calibration_batch_size=16,
            num_calibration_batches=1,
        )
        results[policy] = pruner.prune(config, calibration_dataset=x)
        assert len(pruner.report.classes) == 1
    assert all(
        torch.equal(a, b)
        for a, b in zip(results["shared"].state_dict().values(), results["search"].state_dict().values())
    )


def test_search_needs_calibration_data():
    pruner = IsomorphicPruner(build("vit"))
    with pytest.raises(CalibrationDataError, match="budget_policy='search'"):
        pruner.prune(IsomorphicPruningConfig(target_macs=1e5, budget_policy="search", importance="magnitude"))


def test_consumers_list_the_zeroed_inputs_of_channel_mixing_layers(monkeypatch):
    model = build("vit")
    pruner = IsomorphicPruner(model)
    captured = {}
    real_apply = pruner_module.apply_plan

    def apply_plan(graph, plan):
        masks = ChannelMasks(list(plan.removed))
        masks.set_plan(plan)
        captured["consumers"] = {layer: idxs for (layer, _), idxs in masks.consumers.items()}
        captured["names"] = {m: n for n, m in graph.model.named_modules()}
        return real_apply(graph, plan)

    monkeypatch.setattr(pruner_module, "apply_plan", apply_plan)
    pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude", reconstruction="none"))
    names = {captured["names"][layer] for layer in captured["consumers"]}
    assert any(n.endswith("o_proj") for n in names) and any(n.endswith("fc2") for n in names)
    assert all(isinstance(i, np.ndarray) and len(i) for i in captured["consumers"].values())
