"""LeViT adapters (transformers `LevitForImageClassification`, `LevitForImageClassificationWithTeacher`; timm
`levit_*`, not the `levit_conv_*` form: the same network, other names).

What LeViT adds to a ViT, and where that knowledge lives here:
- queries, keys and values come from one Linear + BatchNorm1d (`queries_keys_values`) laid out head by head, each head
  [key_dim q | key_dim k | attention_ratio * key_dim v]: queries and keys are narrower than values. The subsampling
  attention between stages has keys and values laid out the same way ([k | v] per head, `keys_values`) and queries
  from a separate Linear + BatchNorm1d on the subsampled tokens (`queries`). torch-pruning cannot map these layouts,
  so the copy being pruned traces values only: the Linear holding them runs as `_TracedValues` (its value rows, the
  BatchNorm folded in), queries, keys and attention weights are constants to autograd (the same values), and
  `LevitValuesPruner` removes every row of a head (Linear and BatchNorm, the subsample's queries too) with its value
  channels. The group's root is the output projection's input (heads x value dim), as for every attention;
- whole heads are pruned, with their rows of `attention_biases` (heads on the first dim, `head_rows`); key and value
  dims are kept (`keep_head_dims`): q and k dims are coupled through the scores, not through the value channels;
- the residual width of each stage is kept: the subsampling attention reads it through a strided token subsample
  torch-pruning maps wrongly, and every MLP / projection writes it after a BatchNorm. The layers writing it are kept
  whole (`classifiers`), so residual groups are skipped; MLP hidden channels and the patch embedding's inner conv
  channels are pruned;
- attention MACs: QK^T at key_dim and AV at the value dim per head, the subsample's queries on the subsampled tokens
  (`LevitHeads.matmul_macs`);
- eval mode caches the gathered attention biases per device, with their autograd graph: the copy being pruned
  gathers them on every call until surgery is done (calibration runs it in eval mode, one backward per batch), and
  the cache is cleared whenever heads change; the copy is made without the user's caches (`copy_model`).

Names above are transformers'; timm's (`qkv`, `kv`, `q.ln`, `proj.ln`, `num_heads`, `val_dim`, ...) are the other row
of the `_Names` table, the only per-library knowledge here.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from .base import Attention, AttentionLayout, _get
from .timm_models import TimmAdapter
from .transformers_models import TransformersAdapter

LEVIT_ATTENTION = AttentionLayout(
    projections=("queries_keys_values.linear",),
    output="projection.linear",
    num_heads_attr="num_attention_heads",
    head_dim_attr=None,
    inner_dim_attr="out_dim_projection",
    head_rows=("attention_biases",),
)
LEVIT_SUBSAMPLE_ATTENTION = AttentionLayout(
    projections=("keys_values.linear", "queries.linear"),
    output="projection.linear",
    num_heads_attr="num_attention_heads",
    head_dim_attr=None,
    inner_dim_attr="out_dim_projection",
    head_rows=("attention_biases",),
)

# timm's: the same network with other names (`LinearNorm` = Linear + BatchNorm1d as `linear` / `bn`)
TIMM_LEVIT_ATTENTION = AttentionLayout(
    projections=("qkv.linear",),
    output="proj.ln.linear",
    num_heads_attr="num_heads",
    head_dim_attr=None,
    inner_dim_attr="val_attn_dim",
    head_rows=("attention_biases",),
)
TIMM_LEVIT_SUBSAMPLE_ATTENTION = dataclasses.replace(TIMM_LEVIT_ATTENTION, projections=("kv.linear", "q.ln.linear"))

LEVIT_MODEL_TYPES = {"levit": "LevitForImageClassification, LevitForImageClassificationWithTeacher"}
# timm's `levit_*` models are `LevitDistilled`; `distilled=False` builds `Levit`
LEVIT_TIMM_CLASSES = {"timm.models.levit.Levit": "levit_*", "timm.models.levit.LevitDistilled": "levit_*"}


@dataclass(frozen=True)
class _Names:
    """Where one library keeps a LeViT attention's parts (paths from the attention module)."""

    classes: tuple[str, str]  # the attention and the subsampling attention class names
    sources: tuple[str, str]  # the Linear + BatchNorm holding q / k / v rows, and the subsample's keys / values
    norm: str  # the BatchNorm1d's name inside it
    queries: str  # the subsample's queries (Linear + BatchNorm)
    queries_down: str  # the subsample's token subsample
    projection: str  # the output projection (Linear + BatchNorm), after the activation
    activation: str
    heads: str  # head count attribute
    rows_attr: str | None  # attribute caching heads x rows per head (transformers)
    keys_attr: str | None  # attribute caching heads x key dim (timm)
    layouts: tuple[AttentionLayout, AttentionLayout]

    def value_dim(self, module: nn.Module) -> int:
        return int(getattr(module, "val_dim", None) or module.attention_ratio * module.key_dim)

    def queries_count(self, module: nn.Module) -> int:
        return int(module.attention_bias_idxs.shape[0])


TRANSFORMERS_NAMES = _Names(
    classes=("LevitAttention", "LevitAttentionSubsample"),
    sources=("queries_keys_values", "keys_values"),
    norm="batch_norm",
    queries="queries",
    queries_down="queries_subsample",
    projection="projection",
    activation="activation",
    heads="num_attention_heads",
    rows_attr="out_dim_keys_values",
    keys_attr=None,
    layouts=(LEVIT_ATTENTION, LEVIT_SUBSAMPLE_ATTENTION),
)
TIMM_NAMES = _Names(
    classes=("Attention", "AttentionDownsample"),
    sources=("qkv", "kv"),
    norm="bn",
    queries="q.ln",
    queries_down="q.down",
    projection="proj.ln",
    activation="proj.act",
    heads="num_heads",
    rows_attr=None,
    keys_attr="key_attn_dim",
    layouts=(TIMM_LEVIT_ATTENTION, TIMM_LEVIT_SUBSAMPLE_ATTENTION),
)


def _is_subsample(module: nn.Module) -> bool:
    return type(module).__name__ in (TRANSFORMERS_NAMES.classes[1], TIMM_NAMES.classes[1])


def _names(module: nn.Module) -> _Names:
    return TIMM_NAMES if type(module).__module__.startswith("timm.") else TRANSFORMERS_NAMES


def _source(module: nn.Module) -> nn.Module:
    return module.get_submodule(_names(module).sources[int(_is_subsample(module))])


def _norm(pair: nn.Module) -> nn.BatchNorm1d:
    return getattr(pair, "batch_norm", None) or pair.bn


class LevitHeads(Attention):
    """A LeViT attention: `head_dim` is the value dim; each head holds `rows_per_head` rows of the first projection
    (2 key_dim + value dim, or key_dim + value dim for the subsample's keys and values)."""

    @property
    def key_dim(self) -> int:
        return int(self.module.key_dim)

    @property
    def rows_per_head(self) -> int:
        return (1 if _is_subsample(self.module) else 2) * self.key_dim + self.head_dim

    def heads_left(self, removed_rows: int = 0) -> int:
        return (self.projections[0].out_features - removed_rows) // self.rows_per_head

    def inner_features(self, removed_rows: int = 0) -> int:
        return self.heads_left(removed_rows) * self.head_dim

    def matmul_macs(self, tokens: int, keys: int, removed_rows: int = 0) -> int:
        """QK^T at key_dim, AV at the value dim; the subsample's queries are its subsampled tokens."""
        queries = _names(self.module).queries_count(self.module) if _is_subsample(self.module) else tokens
        return queries * keys * self.heads_left(removed_rows) * (self.key_dim + self.head_dim)

    def set_shape(self, num_heads: int, head_dim: int, kept_heads: Sequence[int] | None = None) -> None:
        super().set_shape(num_heads, head_dim, kept_heads)
        names = _names(self.module)
        if names.rows_attr:
            setattr(self.module, names.rows_attr, num_heads * self.rows_per_head)
        if names.keys_attr:
            setattr(self.module, names.keys_attr, num_heads * self.key_dim)
        self.module.attention_bias_cache = {}


@dataclass(eq=False)
class _Values:
    """What the traced copy's value Linear knows about its attention (a plain object: never a submodule)."""

    batch_norm: nn.BatchNorm1d
    key_dim: int
    value_dim: int
    offset: int  # where a head's values start among its rows
    queries: nn.Module | None  # the subsample's queries (Linear + BatchNorm1d), pruned with the heads
    traced: bool = True  # False after tracing (`restore`): the Linear runs as itself

    @property
    def queries_norm(self) -> nn.BatchNorm1d:
        return _norm(self.queries)

    @property
    def rows_per_head(self) -> int:
        return self.offset + self.value_dim


class _TracedValues(nn.Linear):
    """The Linear holding a LeViT attention's q / k / v rows, in the copy being pruned: while traced it returns the
    values only (BatchNorm folded in), heads x value dim wide, which is what torch-pruning sees; otherwise a Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        info: _Values = self.__dict__["_levit"]
        if not info.traced:
            return super().forward(x)
        rows = _value_rows(info, self.out_features // info.rows_per_head)
        bn = info.batch_norm
        with torch.no_grad():
            scale = bn.weight[rows] / torch.sqrt(bn.running_var[rows] + bn.eps)
            weight = self.weight[rows] * scale[:, None]
            bias = bn.bias[rows] - bn.running_mean[rows] * scale
        return F.linear(x, weight, bias)


def _value_rows(info: _Values, heads: int) -> torch.Tensor:
    return (torch.arange(heads)[:, None] * info.rows_per_head + info.offset + torch.arange(info.value_dim)).flatten()


def _head_rows(heads: Sequence[int], per_head: int) -> np.ndarray:
    return (np.asarray(heads, dtype=np.int64)[:, None] * per_head + np.arange(per_head)).flatten()


class LevitValuesPruner(tp.pruner.function.BasePruningFunc):
    """torch-pruning pruner for `_TracedValues`: its out channels are value channels (head-major, value dim each);
    removing a head's value channels removes every row of that head."""

    TARGET_MODULES = _TracedValues

    @staticmethod
    def _heads(layer: _TracedValues, idxs: Sequence[int]) -> list[int]:
        info: _Values = layer.__dict__["_levit"]
        heads = sorted({int(i) // info.value_dim for i in idxs})
        if len(idxs) != len(heads) * info.value_dim:
            raise ValueError("LeViT attentions lose whole heads only: their key and value dims are kept.")
        return heads

    def prune_out_channels(self, layer: _TracedValues, idxs: Sequence[int]) -> nn.Module:
        info: _Values = layer.__dict__["_levit"]
        heads = self._heads(layer, idxs)
        rows = _head_rows(heads, info.rows_per_head).tolist()
        tp.prune_linear_out_channels(layer, rows)
        tp.prune_batchnorm_out_channels(info.batch_norm, rows)
        if info.queries is not None:
            query_rows = _head_rows(heads, info.key_dim).tolist()
            tp.prune_linear_out_channels(info.queries.linear, query_rows)
            tp.prune_batchnorm_out_channels(info.queries_norm, query_rows)
        return layer

    def prune_in_channels(self, layer: _TracedValues, idxs: Sequence[int]) -> nn.Module:
        info: _Values = layer.__dict__["_levit"]
        tp.prune_linear_in_channels(layer, idxs)
        if info.queries is not None:
            tp.prune_linear_in_channels(info.queries.linear, idxs)
        return layer

    def get_out_channels(self, layer: _TracedValues) -> int:
        info: _Values = layer.__dict__["_levit"]
        return layer.out_features // info.rows_per_head * info.value_dim

    def get_in_channels(self, layer: _TracedValues) -> int:
        return layer.in_features

    def layer_indices(self, layer: _TracedValues, idxs: np.ndarray, is_out: bool) -> list[tuple]:
        """Rows each layer loses with value channels `idxs`, and for each row the position in `idxs` of a value
        channel of the same head (its root)."""
        info: _Values = layer.__dict__["_levit"]
        idxs = np.asarray(idxs, dtype=np.int64)
        if not is_out:
            found = [(layer, False, idxs)]
            return found + ([(info.queries.linear, False, idxs)] if info.queries is not None else [])
        positions_of = {}
        for position, channel in enumerate(idxs):
            positions_of.setdefault(int(channel) // info.value_dim, []).append(position)

        def rows_and_roots(per_head: int) -> tuple[np.ndarray, np.ndarray]:
            heads = sorted(positions_of)
            rows = _head_rows(heads, per_head)
            roots = np.array([positions_of[h][r % len(positions_of[h])] for h in heads for r in range(per_head)])
            return rows, roots

        rows, roots = rows_and_roots(info.rows_per_head)
        found = [(layer, True, rows, roots), (info.batch_norm, True, rows, roots)]
        if info.queries is not None:
            query_rows, query_roots = rows_and_roots(info.key_dim)
            found += [
                (info.queries.linear, True, query_rows, query_roots),
                (info.queries_norm, True, query_rows, query_roots),
            ]
        return found


def _traced_attention_forward(self: nn.Module, hidden_state: torch.Tensor) -> torch.Tensor:
    """LeViT's attention (plain or subsampling) as torch-pruning traces it: the attention weights are constants to
    autograd (the same values), the values come from `_TracedValues`."""
    names = _names(self)
    batch, tokens, _ = hidden_state.shape
    heads, key_dim, value_dim = getattr(self, names.heads), self.key_dim, names.value_dim(self)
    subsample = _is_subsample(self)
    source = _source(self)
    norm = _norm(source)
    with torch.no_grad():
        rows = F.batch_norm(
            F.linear(hidden_state, source.linear.weight).flatten(0, 1),
            norm.running_mean,
            norm.running_var,
            norm.weight,
            norm.bias,
            False,
            0.0,
            norm.eps,
        ).view(batch, tokens, heads, -1)
        if subsample:
            key = rows[..., :key_dim]
            # counted as a Linear call (its rows go with the heads), kept off the traced graph
            queries = self.get_submodule(names.queries)
            query = queries.linear(self.get_submodule(names.queries_down)(hidden_state))
            query = _norm(queries)(query.flatten(0, 1)).view(batch, -1, heads, key_dim)
        else:
            query, key = rows[..., :key_dim], rows[..., key_dim : 2 * key_dim]
        scores = query.transpose(1, 2) @ key.permute(0, 2, 3, 1) * self.scale
        weights = (scores + self.attention_biases[:, self.attention_bias_idxs]).softmax(dim=-1)
    value = source.linear(hidden_state).view(batch, tokens, heads, value_dim).permute(0, 2, 1, 3)
    hidden = (weights @ value).transpose(1, 2).reshape(batch, -1, heads * value_dim)
    return self.get_submodule(names.projection)(self.get_submodule(names.activation)(hidden))


def _uncached_attention_biases(self: nn.Module, device: torch.device) -> torch.Tensor:
    """The biases gathered on every call: in eval mode LeViT caches them with their autograd graph, which a second
    calibration batch's backward would run through again (Taylor importance runs the copy in eval mode)."""
    return self.attention_biases[:, self.attention_bias_idxs]


def _levit_attentions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m).__name__ in _names(m).classes and hasattr(m, "attention_biases")
    ]


class _LevitMixin:
    """What both libraries' LeViT adapters share: attentions, pruners, kept stage widths, traced forms."""

    def attentions(self, model: nn.Module) -> list[Attention]:
        found = []
        for name, module in _levit_attentions(model):
            layout = _names(module).layouts[int(_is_subsample(module))]
            heads = int(getattr(module, layout.num_heads_attr))
            attention = LevitHeads(name, module, layout, heads, _get(module, layout.output).in_features // heads)
            attention.keep_head_dims = True
            found.append(attention)
        return found

    def classifiers(self, model: nn.Module) -> list[nn.Module]:
        """The heads, and every layer writing a stage's residual stream (kept whole: residual groups are skipped):
        the output projections, the MLPs' second layers and the patch embedding's last conv."""
        writers = [a.output for a in self.attentions(model)] + [
            m.linear for name, m in model.named_modules() if name.endswith(("linear_down", "mlp.ln2"))
        ]
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        return [*super().classifiers(model), *writers, *convs[-1:]]  # type: ignore[misc]

    def copy_model(self, model: nn.Module) -> nn.Module:
        """A copy with empty attention-bias caches: an eval forward with autograd on caches a tensor that is not a
        graph leaf, which `copy.deepcopy` refuses (the user's model is left as it is)."""
        return copy.deepcopy(model, memo={id(m.attention_bias_cache): {} for _, m in _levit_attentions(model)})

    def graph_options(self, model: nn.Module) -> dict[str, Any]:
        return {**super().graph_options(model), "customized_pruners": {_TracedValues: LevitValuesPruner()}}  # type: ignore[misc]

    def make_traceable(self, model: nn.Module) -> None:
        for _, module in _levit_attentions(model):
            names, subsample = _names(module), _is_subsample(module)
            source = _source(module)
            key_dim = int(module.key_dim)
            source.linear.__class__ = _TracedValues
            source.linear.__dict__["_levit"] = _Values(
                batch_norm=_norm(source),
                key_dim=key_dim,
                value_dim=names.value_dim(module),
                offset=key_dim if subsample else 2 * key_dim,
                queries=module.get_submodule(names.queries) if subsample else None,
            )
            module.attention_bias_cache = {}
            module.forward = types.MethodType(_traced_attention_forward, module)
            module.get_attention_biases = types.MethodType(_uncached_attention_biases, module)

    def restore(self, model: nn.Module, reference: nn.Module) -> None:
        """The stock forwards again; the value Linears stay `_TracedValues` (plain Linears now) until surgery is
        done, so that torch-pruning finds their pruner."""
        for _, module in _levit_attentions(model):
            module.__dict__.pop("forward", None)
            for linear in _values_linears(module):
                linear.__dict__["_levit"].traced = False

    def finalize(self, model: nn.Module) -> None:
        for _, module in _levit_attentions(model):
            module.__dict__.pop("get_attention_biases", None)
            for linear in _values_linears(module):
                linear.__class__ = nn.Linear
                del linear.__dict__["_levit"]
            module.attention_bias_cache = {}


class LevitAdapter(_LevitMixin, TransformersAdapter):
    """transformers LeViT classifiers (with or without the distillation head): whole heads (with their attention
    biases), MLP hidden channels and the patch embedding's inner channels; stage widths are kept."""

    attention_layouts = TRANSFORMERS_NAMES.layouts
    classifier_names = ("classifier", "classifier_distill")
    model_types = LEVIT_MODEL_TYPES


class LevitTimmAdapter(_LevitMixin, TimmAdapter):
    """timm `levit_*` (`Levit`, `LevitDistilled`; not the `levit_conv_*` form): what `LevitAdapter` prunes."""

    attention_layouts = TIMM_NAMES.layouts
    timm_classes = LEVIT_TIMM_CLASSES

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return super().supports(model) and not getattr(model, "use_conv", False)

    def make_traceable(self, model: nn.Module) -> None:
        _LevitMixin.make_traceable(self, model)

    def restore(self, model: nn.Module, reference: nn.Module) -> None:
        _LevitMixin.restore(self, model, reference)


def _values_linears(module: nn.Module) -> list[nn.Linear]:
    linear = _source(module).linear
    return [linear] if isinstance(linear, _TracedValues) else []
