"""importance.py: one score per root channel of every group, and the unit scores classes rank."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp

from models import build, logits
from optimum_isoprune.adapters import get_adapter
from optimum_isoprune.errors import CalibrationDataError
from optimum_isoprune.importance import accumulate_gradients, channel_scores, unit_scores
from optimum_isoprune.isomorphic import collect_groups


def _vit_groups():
    model = build("vit").eval()
    adapter = get_adapter(model)
    adapter.make_traceable(model)
    size = adapter.image_size()
    graph = tp.DependencyGraph().build_dependency(
        model, torch.zeros(1, 3, size, size), forward_fn=adapter.logits, **adapter.graph_options(model)
    )
    return model, collect_groups(graph, model, adapter.attentions(model), adapter.classifiers(model))


def test_every_group_gets_one_finite_score_per_channel_and_random_follows_the_seed():
    model, groups = _vit_groups()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert accumulate_gradients(model, [(x, None), (x, torch.tensor([0, 1, 2, 3]))], lambda m, v: logits(m, v)) == 2
    for criterion in ("magnitude", "taylor", "random"):
        scores = channel_scores(groups, criterion, seed=0)
        assert all(scores[g].shape == (g.width,) and bool(torch.isfinite(scores[g]).all()) for g in groups)
    first, again = channel_scores(groups, "random", seed=3), channel_scores(groups, "random", seed=3)
    assert all(torch.equal(first[g], again[g]) for g in groups)


def test_head_and_head_dim_scores_average_over_the_other_axis():
    _, groups = _vit_groups()
    group = next(g for g in groups if g.attention is not None)
    a = group.attention
    scores = torch.arange(a.num_heads * a.head_dim, dtype=torch.float32)
    grid = scores.view(a.num_heads, a.head_dim)
    torch.testing.assert_close(unit_scores(group, scores, heads=True), grid.mean(1))
    torch.testing.assert_close(unit_scores(group, scores, heads=False), grid.mean(0))
    mlp = next(g for g in groups if g.attention is None)
    assert unit_scores(mlp, torch.ones(mlp.width), heads=False).shape == (mlp.width,)


def test_labels_outside_the_models_classes_are_refused():
    model, _ = _vit_groups()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(CalibrationDataError, match="calibration batch 0"):
        accumulate_gradients(model, [(x, torch.tensor([0, 99]))], lambda m, v: logits(m, v))
