"""What the algorithm needs to know about an architecture, and nothing more."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .io import ModelIO


@dataclass
class AttentionLayout:
    """How one library lays out multi-head attention: projection names and the metadata attributes."""

    # Names below may be dotted paths into submodules (data2vec-vision: "attention.query", "output.dense").
    projections: tuple[str, ...]  # ("q_proj", "k_proj", "v_proj") or a fused ("qkv",)
    output: str  # the output projection, whose input channels are the heads' concatenation
    num_heads_attr: str
    head_dim_attr: str | None  # None when the library infers the head dim from the projection width
    inner_dim_attr: str | None = None  # attribute caching num_heads * head_dim, when the library keeps one
    head_params: tuple[str, ...] = ()  # per-head parameters (dotted paths, heads on the last dim), e.g. a bias table
    # Per-head parameters with heads on their first dim (Swin V2's logit scale), or Linear layers whose output
    # features are heads (Swin V2's continuous position-bias MLP): sliced to the kept heads like `head_params`.
    head_rows: tuple[str, ...] = ()
    # How many module levels above the attention module the `head_params` paths start (0: the attention itself;
    # 1: its parent, e.g. BEiT keeps the bias table on the layer, beside the attention).
    head_params_level: int = 0
    # Attribute of a scale the eager path applies while the fused kernel uses 1/sqrt(head_dim) (timm): after
    # head-dim pruning, the original scale is folded into the query weights so both paths agree.
    implicit_scale_attr: str | None = None
    # The scale is recomputed from the head-dim attribute on every call (data2vec-vision): pruned head dims fold the
    # original scale into the query weights the same way.
    scale_from_head_dim: bool = False


@dataclass
class Attention:
    """One multi-head attention module found in a model."""

    name: str
    module: nn.Module
    layout: AttentionLayout
    num_heads: int
    head_dim: int
    owner: nn.Module | None = None  # the module `layout.head_params` are relative to (None: `module`)
    # Set by an adapter where the architecture ties them: whole heads stay (a bias table shared by every layer),
    # or every head keeps all its dims (rotary embeddings rotate dims in pairs, by frequency).
    keep_heads: bool = False
    keep_head_dims: bool = False

    @property
    def projections(self) -> list[nn.Linear]:
        return [_get(self.module, p) for p in self.layout.projections]

    @property
    def output(self) -> nn.Linear:
        return _get(self.module, self.layout.output)

    @property
    def fused(self) -> int:
        """How many of q, k, v one projection module holds (3 for a fused qkv, 1 otherwise)."""
        return 3 if len(self.layout.projections) == 1 else 1

    def inner_features(self, removed_rows: int = 0) -> int:
        """Width of the heads' concatenation the output projection reads, once `removed_rows` output rows of the
        first projection are gone (LeViT overrides it: its queries and keys are narrower than its values)."""
        return (self.projections[0].out_features - removed_rows) // self.fused

    def matmul_macs(self, tokens: int, keys: int, removed_rows: int = 0) -> int:
        """MACs of QK^T and AV for one image: `tokens` queries, each seeing `keys` keys, at the inner width."""
        return 2 * tokens * keys * self.inner_features(removed_rows)

    def head_targets(self) -> list[nn.Module | nn.Parameter]:
        """What loses one entry per removed head (`head_params`, then `head_rows`): bare parameters, and Linear
        layers that lose output features."""
        owner = self.owner or self.module
        return [_get_target(owner, path) for path in (*self.layout.head_params, *self.layout.head_rows)]

    def head_parameters(self) -> list[nn.Parameter]:
        """The bare per-head parameters; torch-pruning cannot map them, we slice them."""
        return [t for t in self.head_targets() if isinstance(t, nn.Parameter)]

    def set_shape(self, num_heads: int, head_dim: int, kept_heads: Sequence[int] | None = None) -> None:
        """Write new head count and head dim into the module (its scaling is kept on purpose), and keep
        the `kept_heads` (original head indices) of its per-head parameters."""
        if (self.layout.head_params or self.layout.head_rows) and num_heads != self.num_heads:
            if kept_heads is None or len(kept_heads) != num_heads:
                raise ValueError(f"{self.name}: {num_heads} heads kept, but kept_heads={kept_heads}.")
            index = torch.as_tensor(list(kept_heads), dtype=torch.long)
            root = self.owner or self.module
            for path, dim in [(p, -1) for p in self.layout.head_params] + [(p, 0) for p in self.layout.head_rows]:
                target = _get_target(root, path)
                if isinstance(target, nn.Linear):
                    _keep_rows(target, ("weight", "bias"), index)
                    target.out_features = num_heads
                else:
                    owner_path, _, attribute = path.rpartition(".")
                    _keep_rows(root.get_submodule(owner_path), (attribute,), index, dim)
        if (self.layout.implicit_scale_attr or self.layout.scale_from_head_dim) and head_dim != self.head_dim:
            self._fold_scale(num_heads, head_dim)
        _set(self.module, self.layout.num_heads_attr, num_heads)
        if self.layout.head_dim_attr:
            _set(self.module, self.layout.head_dim_attr, head_dim)
        if self.layout.inner_dim_attr:
            _set(self.module, self.layout.inner_dim_attr, num_heads * head_dim)
        self.num_heads, self.head_dim = num_heads, head_dim

    def _fold_scale(self, num_heads: int, head_dim: int) -> None:
        """Keep softmax(q k^T * old_scale) when the scale becomes head_dim ** -0.5: queries grow by the ratio."""
        attribute = self.layout.implicit_scale_attr
        old = float(getattr(self.module, attribute)) if attribute else self.head_dim**-0.5
        new = head_dim**-0.5
        query = self.projections[0]
        rows = slice(0, num_heads * head_dim)  # q comes first in a fused qkv and is the whole of a q projection
        with torch.no_grad():
            query.weight[rows] *= old / new
            if query.bias is not None:
                query.bias[rows] *= old / new
        if attribute:
            setattr(self.module, attribute, new)


def _get_target(root: nn.Module, path: str) -> nn.Module | nn.Parameter:
    """The submodule or parameter at `path`."""
    target = _get(root, path)
    if not isinstance(target, (nn.Module, nn.Parameter)):
        raise TypeError(f"{type(root).__name__}.{path} is a {type(target).__name__}, not a module or parameter.")
    return target


def _keep_rows(module: nn.Module, names: Sequence[str], index: torch.Tensor, dim: int = 0) -> None:
    """Replace each named parameter of `module` by its `index` entries along `dim` (a new Parameter)."""
    for name in names:
        old = getattr(module, name)
        if old is not None:
            kept = old.detach().index_select(dim, index.to(old.device)).clone()
            setattr(module, name, nn.Parameter(kept, requires_grad=old.requires_grad))


def detached_forward(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A module's own forward, detached: what a position-bias module (BEiT's table, transformers Swin V2's MLP) computes stays off
    torch-pruning's traced graph (the same values). Set per instance on the copy being pruned."""
    return type(self).forward(self, *args, **kwargs).detach()


def sync_norm_shapes(model: nn.Module) -> None:
    """Set `normalized_shape` from the weight of norms that torch-pruning slices as bare parameters (timm's RmsNorm,
    SimpleNorm: not `nn.LayerNorm` subclasses), so they normalise over their pruned width."""
    for module in model.modules():
        shape, weight = getattr(module, "normalized_shape", None), getattr(module, "weight", None)
        if isinstance(shape, tuple) and isinstance(weight, torch.Tensor) and weight.dim() == len(shape):
            module.normalized_shape = tuple(weight.shape)


def find_attentions(model: nn.Module, layouts: tuple[AttentionLayout, ...]) -> list[Attention]:
    """Find attention modules by role: a module that has all projections of a layout and its metadata."""
    found = []
    for name, module in model.named_modules():
        for layout in layouts:
            levels = layout.head_params_level
            owner = model.get_submodule(".".join(name.split(".")[:-levels])) if levels and name else module
            names = (*layout.projections, layout.output, layout.num_heads_attr, layout.head_dim_attr or layout.output)
            if (
                all(_get(module, a, None) is not None or _has(module, a) for a in names)
                and all(isinstance(_get(module, p), nn.Linear) for p in layout.projections)
                and all(_has_parameter(owner, p) for p in layout.head_params)
                and all(_has(owner, p) for p in layout.head_rows)
            ):
                heads = int(_get(module, layout.num_heads_attr))
                attention = Attention(name, module, layout, heads, 0, owner=owner if levels else None)
                attention.head_dim = (
                    int(_get(module, layout.head_dim_attr))
                    if layout.head_dim_attr
                    else attention.projections[0].out_features // attention.fused // attention.num_heads
                )
                found.append(attention)
                break
    return found


_MISSING = object()


def _get(module: nn.Module, path: str, default: Any = _MISSING) -> Any:
    """`getattr` along a dotted path."""
    value: Any = module
    for part in path.split("."):
        value = getattr(value, part, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise AttributeError(f"{type(module).__name__} has no {path!r}")
            return default
    return value


def _has(module: nn.Module, path: str) -> bool:
    try:
        _get(module, path)
    except AttributeError:
        return False
    return True


def _set(module: nn.Module, path: str, value: Any) -> None:
    owner, _, attribute = path.rpartition(".")
    setattr(_get(module, owner) if owner else module, attribute, value)


def _has_parameter(module: nn.Module, path: str) -> bool:
    try:
        module.get_parameter(path)
    except AttributeError:
        return False
    return True


class ModelAdapter(ModelIO):
    """Per-architecture knowledge; subclasses fill the class attributes and override what differs.

    The algorithm only talks to this interface: logits, input shape, modules to keep whole,
    attention modules, and the switches that make the model traceable (eager attention); the rest
    of the package talks to the model through `ModelIO` (calling it, its input, labels, normalisation).
    """

    attention_layouts: tuple[AttentionLayout, ...] = ()
    classifier_names: tuple[str, ...] = ()
    # What calibration compares to the unpruned model (`objectives.py`): "logits", or a backbone's "features".
    objective: str = "logits"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def describe_supported(cls) -> str:
        raise NotImplementedError

    @classmethod
    def variant_gap(cls, model: nn.Module) -> str | None:
        """Why a model this adapter `supports` is refused all the same (a configuration the pruner does not handle),
        and what to do instead; None when nothing is missing."""
        size, _ = ModelIO(model).input_spec()
        if isinstance(size, tuple):
            return (
                f"takes {size[0]}x{size[1]} images; the pruner traces, calibrates and counts MACs on square images "
                f"only. Build or configure the model with a square image size (e.g. {size[0]}) to prune it."
            )
        return None

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    def image_size(self) -> int:
        raise NotImplementedError

    def num_channels(self) -> int:
        raise NotImplementedError

    def logits(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return model(pixel_values)

    def features(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """A backbone's features (the tensor its feature-matching objective compares); classifiers have none."""
        raise NotImplementedError(f"{type(model).__name__} is pruned on its logits, not on features.")

    def outputs(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tensor calibration compares to the unpruned model: `logits`, or `features` for a backbone."""
        return self.features(model, pixel_values) if self.objective == "features" else self.logits(model, pixel_values)

    def forward(self, model: nn.Module, pixel_values: torch.Tensor) -> Any:
        """Everything a user reads from the model (traced for the dependency graph, counted for MACs): `outputs`,
        and for a backbone also its pooled output, whose layers must be traced to be resized with the rest."""
        return self.outputs(model, pixel_values)

    def classifiers(self, model: nn.Module) -> list[nn.Module]:
        """Output heads: their output channels are the classes and must stay whole."""
        found = []
        for name, module in model.named_modules():
            if name.split(".")[-1] in self.classifier_names and any(
                isinstance(m, (nn.Linear, nn.Conv2d)) for m in module.modules()
            ):
                found.extend(m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        return found

    def attentions(self, model: nn.Module) -> list[Attention]:
        return find_attentions(model, self.attention_layouts)

    def graph_options(self, model: nn.Module) -> dict[str, Any]:
        """Extra `DependencyGraph.build_dependency` arguments (e.g. `customized_pruners` for layers torch-pruning
        cannot trace); per-head parameters are kept out of the graph and sliced by `Attention.set_shape`."""
        return {"ignored_params": [p for a in self.attentions(model) for p in a.head_parameters()]}

    def adjust_graph(self, graph: Any, model: nn.Module) -> None:
        """Correct torch-pruning's traced `DependencyGraph` where one of its heuristics is wrong for this
        architecture (called once, right after tracing)."""

    def make_traceable(self, model: nn.Module) -> None:
        """Switch the copy being pruned to code paths whose every matmul autograd can see."""

    def restore(self, model: nn.Module, reference: nn.Module) -> None:
        """Undo `make_traceable` on the pruned copy, following the user's original model."""

    def finalize(self, model: nn.Module) -> None:
        """Undo what the copy needed only while channels were chosen and removed (called right after surgery, before
        reconstruction)."""

    def resized(self, model: nn.Module) -> None:
        """Undo what the copy needed until reconstruction was done (called on the pruned copy right after it), e.g.
        split timm Swin V2's q / v biases, refit with qkv's rows, back out of `qkv.bias`."""

    def base_model_name(self) -> str | None:
        return None
