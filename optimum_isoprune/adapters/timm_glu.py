"""timm's packed SwiGLU MLP (`GluMlp`: one fc1 holding the gate and value halves, chunked in its forward).

torch-pruning cannot map the packed halves (a split downstream of the cls token is left unmapped), so the copy being
pruned carries fc1 as its two halves, run as two layers as timm's SwiGLU does: their product couples each gate channel
to its value channel in the graph. `pack_glu` packs the pruned halves back into timm's layout after surgery.
"""

from __future__ import annotations

import types

import torch
from timm.layers import GluMlp
from torch import nn


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    """A Linear holding copies of `weight` and `bias` (never initialised: built on the meta device)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=requires_grad)
    return layer


def _replace_children(module: nn.Module, old: tuple[str, ...], new: dict[str, nn.Module]) -> None:
    """Replace the children named `old` by `new`, where the first of them was (module order is kept)."""
    children: dict[str, nn.Module | None] = {}
    for name, child in module._modules.items():
        if name == old[0]:
            children.update(new)
        elif name not in old:
            children[name] = child
    module._modules = children


def split_packed_glu(mlp: GluMlp) -> None:
    """Carry a packed SwiGLU's fc1 as its two halves (`fc1_first`, `fc1_second`: the same rows) and run them as two
    layers, as timm's SwiGLU does: their product then couples each gate channel to its value channel in
    torch-pruning's graph (it cannot map the packed halves: a split downstream of the cls token is left unmapped)."""
    fc1, grad = mlp.fc1, mlp.fc1.weight.requires_grad
    bias = fc1.bias.chunk(2) if fc1.bias is not None else (None, None)
    halves = {name: _linear(w, b, grad) for name, w, b in zip(("fc1_first", "fc1_second"), fc1.weight.chunk(2), bias)}
    _replace_children(mlp, ("fc1",), halves)
    mlp.forward = types.MethodType(_glu_by_halves, mlp)


def _glu_by_halves(self: GluMlp, x: torch.Tensor) -> torch.Tensor:
    """`GluMlp.forward` with fc1 run as its two halves (the same values)."""
    x1, x2 = self.fc1_first(x), self.fc1_second(x)
    x = x1 * self.act(x2) if self.gate_last else self.act(x1) * x2
    return self.drop2(self.fc2(self.norm(self.drop1(x))))


def pack_glu(mlp: GluMlp) -> None:
    """Undo `split_packed_glu` on the pruned halves (both lost the same channels)."""
    first, second = mlp.fc1_first, mlp.fc1_second
    bias = torch.cat((first.bias, second.bias)) if first.bias is not None else None
    fc1 = _linear(torch.cat((first.weight, second.weight)), bias, first.weight.requires_grad)
    _replace_children(mlp, ("fc1_first", "fc1_second"), {"fc1": fc1})
    mlp.__dict__.pop("forward")


def packed_glus(model: nn.Module) -> list[GluMlp]:
    """timm's packed SwiGLU MLPs (one fc1 holding both halves)."""
    return [m for m in model.modules() if isinstance(m, GluMlp)]
