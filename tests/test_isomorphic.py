"""isomorphic.py: dependency groups and the classes whose units are ranked against each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_pruning as tp

from models import build
from optimum_isoprune import IsomorphicPruner, IsomorphicPruningConfig
from optimum_isoprune.adapters import get_adapter
from optimum_isoprune.isomorphic import UNITS, build_classes, collect_groups


def _groups(name: str):
    model = build(name).eval()
    adapter = get_adapter(model)
    adapter.make_traceable(model)
    size = adapter.image_size()
    graph = tp.DependencyGraph().build_dependency(
        model,
        torch.zeros(1, adapter.num_channels(), size, size),
        forward_fn=adapter.logits,
        **adapter.graph_options(model),
    )
    return collect_groups(graph, model, adapter.attentions(model), adapter.classifiers(model))


def test_isomorphic_classes_of_a_vit():
    pruner = IsomorphicPruner(build("vit"))
    pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.5, importance="magnitude"))
    names = sorted(c.name.split(":")[0] for c in pruner.report.classes)
    assert names == ["channels", "head_dim", "heads", "residual"]
    mlp = next(c for c in pruner.report.classes if c.name.startswith("channels"))
    assert mlp.num_groups == 3 and mlp.before == 3 * 256


def test_global_grouping_ranks_everything_in_one_class():
    pruner = IsomorphicPruner(build("vit"))
    pruner.prune(IsomorphicPruningConfig(pruning_ratio=0.4, grouping="global", importance="magnitude"))
    assert sorted(c.name.split(":")[0] for c in pruner.report.classes) == ["global", "heads"]


def test_every_class_carries_its_unit():
    groups = _groups("vit")
    classes = build_classes(groups, "isomorphic", prune_heads=True, prune_head_dims=True)
    units = {c.name.split(":")[0]: c.unit for c in classes}
    assert units == {"heads": "heads", "head_dim": "head_dims", "channels": "channels", "residual": "channels"}
    assert all(c.unit in UNITS and c.heads == (c.unit == "heads") for c in classes)
    for isoclass in classes:  # one signature per class: only isomorphic groups are ranked together
        assert len({g.signature for g in isoclass.groups}) == 1
    without = build_classes(groups, "isomorphic", prune_heads=False, prune_head_dims=False)
    assert {c.unit for c in without} == {"channels"}
    mixed = build_classes(groups, "global", prune_heads=True, prune_head_dims=True)
    assert sorted(c.unit for c in mixed) == ["channels", "heads"]  # head dims ranked with MLP and residual channels


@pytest.mark.parametrize("name", ["vit", "timm_vit"])
def test_a_groups_removed_roots_map_to_each_layers_own_indices(name):
    attention_group = next(g for g in _groups(name) if g.attention is not None)
    a = attention_group.attention
    first_head = np.arange(a.head_dim)
    query = next(t for t in attention_group.targets if t.target is a.projections[0] and t.is_out)
    if a.fused == 3:  # timm's fused qkv: head 0 of q, k and v
        expected = np.concatenate([first_head + i * a.num_heads * a.head_dim for i in range(3)])
    else:
        expected = first_head
    np.testing.assert_array_equal(np.sort(query.removed(first_head)), expected)
    output = next(t for t in attention_group.targets if t.target is a.output and not t.is_out)
    np.testing.assert_array_equal(np.sort(output.removed(first_head)), first_head)
