"""Physical removal of a `Plan`'s channels (torch-pruning does the slicing) and what it removed where."""

from __future__ import annotations

import numpy as np
import torch_pruning as tp
from torch import nn

from .budget import Plan
from .isomorphic import PrunableGroup
from .report import LayerWidth

# (layer, is_out_dim) -> original indices removed from that dimension of the layer
RemovedIndices = dict[tuple[nn.Module, bool], np.ndarray]


def apply_plan(graph: tp.DependencyGraph, plan: Plan) -> RemovedIndices:
    """Remove the planned channels, write the new head shapes into attention modules, and return
    the original indices each Linear / Conv2d / norm lost on its input or output dimension."""
    removed: RemovedIndices = {}
    for group, idxs in plan.removed.items():
        if len(idxs) == 0:
            continue
        pruning_group = graph.get_pruning_group(group.root, group.root_fn, idxs.tolist())
        if not graph.check_pruning_group(pruning_group):
            raise RuntimeError(f"torch-pruning refused to prune group {group.name} (it would empty a layer).")
        _record(graph, pruning_group, removed)
        pruning_group.prune()
    for group, idxs in plan.removed.items():
        attention = group.attention
        if attention is not None:
            kept = attention.projections[0].out_features // attention.fused
            heads = kept_heads(group, plan)
            attention.set_shape(heads, kept // heads, kept_heads=_kept_head_indices(group, idxs))
    return removed


def _record(graph: tp.DependencyGraph, pruning_group: tp.dependency.Group, removed: RemovedIndices) -> None:
    """Add the layer-local indices a pruning group is about to remove (in the layers' current numbering)."""
    for item in pruning_group:
        target = item.dep.target.module
        if isinstance(target, nn.Parameter):
            continue
        is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
        idxs = np.asarray([getattr(i, "idx", i) for i in item.idxs], dtype=np.int64)  # drop the root indices
        expand = getattr(graph.get_pruner_of_module(target), "layer_indices", None)
        for layer, layer_is_out, layer_idxs in expand(target, idxs, is_out) if expand else [(target, is_out, idxs)]:
            key = (layer, layer_is_out)
            removed[key] = np.union1d(removed[key], _original(removed[key], layer_idxs)) if key in removed else layer_idxs


def _original(already_removed: np.ndarray, idxs: np.ndarray) -> np.ndarray:
    """Map indices of a dimension that already lost `already_removed` back to the original numbering."""
    survivors = np.setdiff1d(np.arange(int(idxs.max(initial=-1)) + 1 + len(already_removed)), already_removed)
    return survivors[idxs]


def layer_widths(plan: Plan) -> list[LayerWidth]:
    """Per-layer widths before and after the plan (heads and head dims for attention groups)."""
    layers = []
    for group, idxs in plan.removed.items():
        if group.attention is None:
            layers.append(LayerWidth(group.name, group.kind, group.width, group.width - len(idxs)))
            continue
        a = group.attention
        heads = kept_heads(group, plan)
        dims = (group.width - len(idxs)) // heads
        layers.append(LayerWidth(a.name, "heads", a.num_heads, heads))
        layers.append(LayerWidth(a.name, "head_dim", a.head_dim, dims))
    return layers


def _kept_head_indices(group: PrunableGroup, removed) -> list[int]:
    """Original indices of the heads that keep at least one channel."""
    a, gone = group.attention, {int(i) for i in removed}
    return [h for h in range(a.num_heads) if any(h * a.head_dim + d not in gone for d in range(a.head_dim))]


def kept_heads(group: PrunableGroup, plan: Plan) -> int:
    """Heads an attention group keeps under the plan."""
    for cls, kept in plan.kept_units.items():
        if cls.heads and group in cls.groups:
            return int(kept[cls.groups.index(group)])
    return group.attention.num_heads
