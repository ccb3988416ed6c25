"""Dependency groups and their isomorphic classes (steps 1-2 of the method).

A *group* is a set of coupled channels that must be removed together (torch-pruning finds them).
Two groups are *isomorphic* when their sub-graphs match: the same layer types touched in the same
way, with the same width. Only isomorphic groups are ranked against each other.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch_pruning as tp
from torch import nn

from .adapters.base import Attention


@dataclass(eq=False)
class GroupTarget:
    """One layer (or bare parameter) touched by a group, with the group's root channel of each index."""

    target: nn.Module | nn.Parameter
    is_out: bool
    root_idxs: np.ndarray
    idxs: np.ndarray  # the layer's own channel index of each entry (same order as root_idxs)

    @property
    def key(self) -> tuple[int, bool]:
        return id(self.target), self.is_out

    def removed(self, root_removed: np.ndarray) -> np.ndarray:
        """This layer's own indices (original numbering) of the group's removed root channels."""
        return self.idxs[np.isin(self.root_idxs, root_removed)]


@dataclass(eq=False)
class PrunableGroup:
    """Coupled channels rooted at one layer; attention groups are rooted at the output projection."""

    name: str
    root: nn.Module
    root_fn: Callable
    width: int
    kind: str  # "attention", "residual" or "channels"
    signature: tuple
    targets: list[GroupTarget]
    tp_group: tp.dependency.Group
    attention: Attention | None = None
    # Grouped convolutions (not depthwise) in the group: channel c lives in conv group c // (width // channel_groups),
    # and every conv group must lose the same offsets, so a unit is one offset taken from all of them.
    channel_groups: int = 1


UNITS = ("channels", "heads", "head_dims")


@dataclass(eq=False)
class IsomorphicClass:
    """Groups whose units are ranked against each other; `unit` says what one unit is: a channel (an MLP neuron,
    a conv or residual channel), a whole attention head, or one dimension inside every head ("head_dims")."""

    name: str
    groups: list[PrunableGroup] = field(default_factory=list)
    unit: str = "channels"

    @property
    def heads(self) -> bool:
        """Units are whole heads (ranked per head, at least `min_heads` kept per layer)."""
        return self.unit == "heads"


def collect_groups(
    graph: tp.DependencyGraph,
    model: nn.Module,
    attentions: list[Attention],
    ignored: list[nn.Module],
) -> list[PrunableGroup]:
    """Every prunable group of `model`, skipping groups that would change an ignored layer's outputs."""
    names = {module: name for name, module in model.named_modules()}
    by_projection = {id(p): a for a in attentions for p in a.projections}
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
        attention = next(
            (
                by_projection[id(d.target.module)]
                for d, _ in group
                if id(d.target.module) in by_projection and graph.is_out_channel_pruning_fn(d.handler)
            ),
            None,
        )
        if attention is not None:
            out = attention.output
            group = graph.get_pruning_group(
                out, graph.get_pruner_of_module(out).prune_in_channels, list(range(out.in_features))
            )
        groups.append(_describe(graph, group, names, attention))
    return groups


def _describe(graph, group, names, attention: Attention | None) -> PrunableGroup:
    targets, signature, producers, channel_groups = [], [], 0, 1
    for item in group:
        target, is_out = item.dep.target.module, graph.is_out_channel_pruning_fn(item.dep.handler)
        if not (isinstance(target, nn.Parameter) or target in names):
            continue  # torch-pruning's internal ops (reshape, add, ...) hold no weights
        root_idxs = np.asarray(item.root_idxs, dtype=np.int64)
        idxs = np.asarray([getattr(i, "idx", i) for i in item.idxs], dtype=np.int64)
        # A customized pruner (an adapter's, for a block torch-pruning cannot trace) lists the layers it changes;
        # each layer's indices repeat the block's channels block-wise, so the root of entry j is root_idxs[j % n],
        # unless the pruner also gives, per entry, the position in `idxs` of the channel it goes with (LeViT: every
        # q / k / v row of a head goes with that head's value channels).
        expand = (
            None
            if isinstance(target, nn.Parameter)
            else getattr(graph.get_pruner_of_module(target), "layer_indices", None)
        )
        for layer, layer_is_out, layer_idxs, *positions in (
            expand(target, idxs, is_out) if expand else [(target, is_out, idxs)]
        ):
            layer_roots = root_idxs[np.asarray(positions[0])] if positions else np.resize(root_idxs, len(layer_idxs))
            targets.append(GroupTarget(layer, layer_is_out, layer_roots, np.asarray(layer_idxs, dtype=np.int64)))
            signature.append((type(layer).__name__, layer_is_out, len(layer_idxs)))
            producers += int(layer_is_out and isinstance(layer, (nn.Linear, nn.Conv2d)))
            if _conv_groups(layer) > 1 and not np.array_equal(layer_idxs, root_idxs):
                raise ValueError(
                    f"{names.get(layer, layer)}: a grouped convolution or GroupNorm whose channels are reordered "
                    "relative to its group's root cannot keep equal conv groups; not supported."
                )
            channel_groups = math.lcm(channel_groups, _conv_groups(layer))
    root, root_fn = group[0].dep.target.module, group[0].dep.handler
    width = len(group[0].idxs)
    kind = "attention" if attention is not None else ("residual" if producers > 1 else "channels")
    if width % channel_groups:
        raise ValueError(f"{names[root]}: {width} channels cannot be split into {channel_groups} convolution groups.")
    return PrunableGroup(
        name=names[root],
        root=root,
        root_fn=root_fn,
        width=width,
        kind=kind,
        signature=(kind, width, channel_groups, tuple(signature)),
        targets=targets,
        tp_group=group,
        attention=attention,
        channel_groups=channel_groups,
    )


def _conv_groups(layer: nn.Module | nn.Parameter) -> int:
    """The groups of a grouped (not depthwise) convolution or of a GroupNorm, else 1; torch-pruning couples a
    depthwise conv's input and output channel by channel, but slices a grouped conv's input assuming equal offsets
    per group, and a GroupNorm keeps its group count (each group must keep the same number of channels)."""
    if isinstance(layer, nn.Conv2d) and 1 < layer.groups < layer.in_channels:
        return layer.groups
    if isinstance(layer, nn.GroupNorm) and 1 < layer.num_groups < layer.num_channels:
        return layer.num_groups
    return 1


def _pattern(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _class_name(prefix: str, groups: list[PrunableGroup]) -> str:
    patterns = sorted({_pattern(g.attention.name if g.attention else g.name) for g in groups})
    return f"{prefix}:{patterns[0]}" + (f" (+{len(patterns) - 1})" if len(patterns) > 1 else "")


def _kind(group: PrunableGroup) -> str:
    return "head_dim" if group.attention is not None else group.kind


def _channel_unit(groups: list[PrunableGroup]) -> str:
    """Channels of attention groups are head dims; a class mixing them with other channels counts as channels."""
    return "head_dims" if all(g.attention is not None for g in groups) else "channels"


def build_classes(
    groups: list[PrunableGroup], grouping: str, prune_heads: bool, prune_head_dims: bool
) -> list[IsomorphicClass]:
    """Partition groups into ranking classes.

    "isomorphic": one class per signature (the paper); "global": all channel groups in one class;
    "uniform": one class per group (every layer by the same ratio). Heads are always a class of their own.
    """
    channel_groups = [g for g in groups if g.attention is None or (prune_head_dims and not g.attention.keep_head_dims)]
    attention_groups = [g for g in groups if g.attention is not None and not g.attention.keep_heads]
    if grouping == "isomorphic":
        buckets: dict[tuple, list[PrunableGroup]] = {}
        for g in channel_groups:
            buckets.setdefault(g.signature, []).append(g)
        partitions = list(buckets.values())
    elif grouping == "global":
        partitions = [channel_groups] if channel_groups else []
    else:
        partitions = [[g] for g in channel_groups]
    classes = [
        IsomorphicClass("global" if grouping == "global" else _class_name(_kind(p[0]), p), p, _channel_unit(p))
        for p in partitions
    ]
    if prune_heads and attention_groups:
        head_partitions = [[g] for g in attention_groups] if grouping == "uniform" else [attention_groups]
        classes += [IsomorphicClass(_class_name("heads", p), p, "heads") for p in head_partitions]
    return classes
