"""Physical removal of a `Plan`'s channels (torch-pruning does the slicing) and what it removed where."""

from __future__ import annotations

import torch_pruning as tp

from .budget import Plan, RemovedIndices
from .isomorphic import PrunableGroup
from .report import LayerWidth


def apply_plan(graph: tp.DependencyGraph, plan: Plan) -> RemovedIndices:
    """Remove the planned channels, write the new head shapes into attention modules, and return
    the original indices each Linear / Conv2d / norm lost on its input or output dimension."""
    removed = plan.removed_indices()  # in the original numbering, before any layer shrinks
    for group, idxs in plan.removed.items():
        if len(idxs) == 0:
            continue
        pruning_group = graph.get_pruning_group(group.root, group.root_fn, idxs.tolist())
        if not graph.check_pruning_group(pruning_group):
            raise RuntimeError(f"torch-pruning refused to prune group {group.name} (it would empty a layer).")
        pruning_group.prune()
    for group, idxs in plan.removed.items():
        attention = group.attention
        if attention is not None:
            kept = attention.inner_features()
            heads = kept_heads(group, plan)
            attention.set_shape(heads, kept // heads, kept_heads=_kept_head_indices(group, idxs))
    return removed


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
    for isoclass, kept in plan.kept_units.items():
        if isoclass.heads and group in isoclass.groups:
            return int(kept[isoclass.groups.index(group)])
    return group.attention.num_heads
