"""MACs and parameter counts: the one place that counts.

MACs are those of every Linear and Conv2d plus both attention matmuls (QK^T and AV), for one image:
2 x queries x keys per query x inner width, where keys per query is the sequence length the query
projection sees (all tokens for global attention, the window's tokens for windowed attention).
Counts are analytic (positions measured once by a forward pass, times layer widths), so the budget
can evaluate thousands of candidate widths without touching the model; `torch.utils.flop_counter`
with eager attention is the independent check used in the tests. An `nn.MultiheadAttention` (never pruned) counts
its four projections and both matmuls at its own width.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from .adapters.base import Attention
from .guards import hooks_removed

Removed = Mapping[tuple[int, bool], int]  # (id(layer or parameter), is_out_dim) -> channels removed


@dataclass
class _LayerCost:
    module: nn.Module
    positions: int  # output positions per image (tokens for Linear, H*W for Conv2d)
    sequence: int  # length of the token axis a Linear sees (a window's tokens under windowed attention)


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


class CostModel:
    """MACs / params of a model as a function of the channels removed from each layer."""

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        attentions: list[Attention],
        forward: Callable[[nn.Module, torch.Tensor], object],
    ):
        if example_input.shape[0] != 1:
            raise ValueError("CostModel needs an example input with batch size 1.")
        with self._hooks(model):
            with torch.no_grad():
                forward(model, example_input)
        self._finish(model, attentions)

    @classmethod
    @contextmanager
    def recording(cls, model: nn.Module, attentions: list[Attention]) -> Iterator["CostModel"]:
        """Measure during a forward pass of one image that runs anyway (e.g. tracing the dependency graph)."""
        cost = cls.__new__(cls)
        with cost._hooks(model):
            yield cost
        cost._finish(model, attentions)

    @contextmanager
    def _hooks(self, model: nn.Module) -> Iterator[None]:
        self.layers: list[_LayerCost] = []
        self.fixed_macs = 0  # layers never pruned whose weights no module hook sees (nn.MultiheadAttention)
        handles = [
            m.register_forward_hook(self._record) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
        ]
        handles += [
            m.register_forward_hook(self._record_multihead, with_kwargs=True)
            for m in model.modules()
            if isinstance(m, nn.MultiheadAttention)
        ]
        with hooks_removed(handles):
            yield

    def _finish(self, model: nn.Module, attentions: list[Attention]) -> None:
        positions = {id(c.module): c.positions for c in self.layers}
        sequences = {id(c.module): c.sequence for c in self.layers}
        self.attentions = [(a, positions[id(a.projections[0])], sequences[id(a.projections[0])]) for a in attentions]
        self._param_sizes = {id(p): p.numel() for p in model.parameters()}
        self.objects: dict[int, nn.Module | nn.Parameter] = {id(m): m for m in model.modules()}
        self.objects.update({id(p): p for p in model.parameters()})

    def _record(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        # The batch is one image, but windowed models fold windows into the leading dim: count every row.
        if isinstance(module, nn.Conv2d):
            positions, sequence = output.shape[-2] * output.shape[-1], 1
        else:
            positions, sequence = output.numel() // output.shape[-1], (output.shape[-2] if output.dim() > 2 else 1)
        self.layers.append(_LayerCost(module, positions, sequence))

    def _record_multihead(self, module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: object) -> None:
        """Its projections run as F.linear on its own weights: q, k, v and out projections plus both matmuls."""
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        batch = query.shape[0 if module.batch_first else 1] if query.dim() == 3 else 1
        queries, keys = query.numel() // query.shape[-1], key.numel() // key.shape[-1]
        embed = module.embed_dim
        projections = queries * embed * embed * 2 + keys * (module.kdim + module.vdim) * embed
        self.fixed_macs += projections + 2 * queries * (keys // batch) * embed

    def macs(self, removed: Removed | None = None) -> int:
        removed = removed or {}
        total = getattr(self, "fixed_macs", 0)
        for layer in self.layers:
            m = layer.module
            r_in, r_out = removed.get((id(m), False), 0), removed.get((id(m), True), 0)
            if isinstance(m, nn.Linear):
                total += layer.positions * (m.in_features - r_in) * (m.out_features - r_out)
            elif _is_depthwise(m):
                kept = m.out_channels - max(r_in, r_out)
                total += layer.positions * kept * m.kernel_size[0] * m.kernel_size[1]
            else:
                fan_in = (m.in_channels - r_in) // m.groups * m.kernel_size[0] * m.kernel_size[1]
                total += layer.positions * (m.out_channels - r_out) * fan_in
        for attention, tokens, keys in self.attentions:
            q = attention.projections[0]
            total += attention.matmul_macs(tokens, keys, removed.get((id(q), True), 0))
        return int(total)

    def params(self, removed: Removed | None = None, sizes: Mapping[tuple[int, bool], int] | None = None) -> int:
        """Parameter count after removing channels; `sizes` gives the full channel count of each
        touched bare parameter or norm layer (the dimension being pruned)."""
        removed, sizes = removed or {}, sizes or {}
        total = sum(self._param_sizes.values())
        for key in {k[0] for k, v in removed.items() if v}:
            target = self.objects[key]
            r_in, r_out = removed.get((key, False), 0), removed.get((key, True), 0)
            before = self._own_params(target)
            if isinstance(target, nn.Linear):
                after = _linear_params(target, target.in_features - r_in, target.out_features - r_out)
            elif isinstance(target, nn.Conv2d) and not _is_depthwise(target):
                kept_out = target.out_channels - r_out
                fan_in = (target.in_channels - r_in) // target.groups * target.kernel_size[0] * target.kernel_size[1]
                after = kept_out * fan_in + (kept_out if target.bias is not None else 0)
            else:  # channel-wise tensors: norms, depthwise convs, bare parameters
                full = sizes.get((key, True)) or sizes.get((key, False)) or target.out_channels
                after = before * (full - max(r_in, r_out)) // full
            total -= before - after
        return int(total)

    @staticmethod
    def _own_params(target: nn.Module | nn.Parameter) -> int:
        if isinstance(target, nn.Parameter):
            return target.numel()
        return sum(p.numel() for p in target.parameters(recurse=False))


def _linear_params(m: nn.Linear, fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + (fan_out if m.bias is not None else 0)


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def count_macs(model: nn.Module, image_size: int | None = None, num_channels: int | None = None) -> int:
    """MACs of `model` for one image, attention matmuls included (architecture found by its adapter)."""
    from .adapters import get_adapter

    adapter = get_adapter(model)
    size = image_size or adapter.image_size()
    channels = num_channels or adapter.num_channels()
    device = next(model.parameters()).device
    example = torch.zeros(1, channels, size, size, device=device)
    was_training = model.training
    model.eval()
    try:
        return CostModel(model, example, adapter.attentions(model), adapter.forward).macs()
    finally:
        model.train(was_training)
