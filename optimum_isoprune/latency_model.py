"""A latency model measured on this device: predicted milliseconds of a pruning plan (`target_latency`).

Every operation whose cost depends on kept widths (Linear and Conv2d layers, depthwise convolutions,
LayerNorm / BatchNorm, the activations after them, and the attention product itself) is timed in
isolation, at the batch size, device, dtype and threads of the target, on a coarse grid of kept widths
(multiples of the rounding step); between grid points the time is interpolated. Layers of the same
shape share one table, so a 12-block ViT times each shape once. Warm-up runs come first and each point
is a median. The tables give relative costs; the unpruned model's measured end-to-end latency sets the
scale (prediction = base latency x tables(plan) / tables(unpruned)). The pruner measures every
latency-targeted result beside the unpruned model; when the measured ratio misses the predicted one by
more than `CALIBRATION_TOLERANCE`, the predictions are corrected by that miss (a secant step: the error is
taken as locally proportional, never extrapolated to other widths) and the budget is solved once more.

Measurements are cached on disk (`latency_cache_dir`), keyed by the device description, the model's
shape, batch size, dtype, threads, grid and library versions; any change measures again.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .adapters import adapter_for
from .budget import ClassRanking, Plan
from .counting import CostModel
from .errors import ConfigurationError
from .guards import hooks_removed
from .isomorphic import IsomorphicClass, PrunableGroup
from .latency import describe_machine

logger = logging.getLogger(__name__)

CALIBRATION_TOLERANCE = 0.03  # measured vs predicted further apart than this: the budget is solved once more
NOISE_WARNING = 0.10  # interquartile range / median of repeated timings above which the device counts as busy
COLD_BYTES = 64 * 2**20  # parameters cycled through per timed layer shape, to keep them out of the caches
MAX_COPIES = 64
SIDE_BY_SIDE_ROUNDS = 2  # the pruned result is timed alternately with the unpruned model, so that load hits both
CACHE_ENV = "OPTIMUM_ISOPRUNE_CACHE"
CACHE_FORMAT = 4  # raise when the way of timing changes: older caches are then measured again


@dataclass
class TimedOp:
    """One piece of work the timer measures: `run()` does it once; `macs` is its size (elements for
    element-wise work), for timers that model time instead of measuring it (tests)."""

    kind: str  # "linear", "conv", "depthwise", "attention", "layer_norm", "batch_norm", "elementwise", "model"
    widths: tuple[int, ...]
    macs: int
    run: Callable[[], Any]


Timer = Callable[[TimedOp], list[float]]  # milliseconds of the timed runs of one op


class WallClock:
    """The real timer: `warmup` untimed runs, then `repeats` timed ones (synchronised on CUDA)."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    @torch.inference_mode()
    def __call__(self, op: TimedOp) -> list[float]:
        for _ in range(self.warmup):
            op.run()
        self._sync()
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            op.run()
            self._sync()
            times.append((time.perf_counter() - start) * 1e3)
        return times

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


@dataclass(frozen=True)
class LatencySettings:
    """What a latency refers to: batch size, device, dtype, CPU threads; and how it is measured."""

    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    grid_points: int = 6
    repeats: int = 10
    cache_dir: str | None = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def warmup(self) -> int:
        return max(1, self.repeats // 4)

    def cache_folder(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "optimum_isoprune")
        return Path(root) / "latency"

    @contextlib.contextmanager
    def threads_set(self) -> Iterator[None]:
        """CPU threads as the target says, restored afterwards."""
        before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)


@dataclass
class LatencySummary:
    """Predicted vs measured end-to-end latency of a latency-targeted run (ms per batch)."""

    target_ms: float
    predicted_ms: float
    measured_ms: float
    base_measured_ms: float
    base_predicted_ms: float
    measured_spread: float  # interquartile range / median of the pruned model's timed runs
    base_spread: float  # the same for the unpruned model timed beside it
    batch_size: int
    device: str
    dtype: str
    threads: int
    machine: str
    repeats: int
    cached: bool  # the tables came from the disk cache
    correction: float  # measured / predicted of a first result that missed, applied to a second solve (else 1)
    timed_points: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def target_error(self) -> float:
        return abs(self.measured_ms - self.target_ms) / self.target_ms

    def describe(self) -> str:
        return (
            f"target {self.target_ms:.4g} ms / batch of {self.batch_size}: predicted {self.predicted_ms:.4g} ms, "
            f"measured {self.measured_ms:.4g} ms (base {self.base_measured_ms:.4g} ms, spread "
            f"{self.measured_spread:.1%}) on {self.machine}, {self.dtype}"
        )


def relative_spread(times: Sequence[float]) -> float:
    """Interquartile range over median of repeated timings (0 for fewer than 4 runs)."""
    if len(times) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4)
    median = statistics.median(times)
    return (q3 - q1) / median if median > 0 else 0.0


# -- the ops of one model --------------------------------------------------------------------------------

Width = Callable[[Plan], int]


@dataclass(eq=False)
class _Table:
    """Measured milliseconds of one operation shape on a grid of kept widths (1 or 2 axes)."""

    kind: str
    signature: tuple
    axes: list[np.ndarray]
    build: Callable[[tuple[int, ...]], TimedOp]
    values: np.ndarray | None = None

    def key(self) -> str:
        return repr((self.signature, [a.tolist() for a in self.axes]))

    def __call__(self, widths: Sequence[float]) -> float:
        if len(self.axes) == 1:
            return float(np.interp(widths[0], self.axes[0], self.values))
        (a, b), (x, y) = self.axes, widths
        i = int(np.clip(np.searchsorted(a, x) - 1, 0, max(len(a) - 2, 0)))
        j = int(np.clip(np.searchsorted(b, y) - 1, 0, max(len(b) - 2, 0)))
        if len(a) == 1 and len(b) == 1:
            return float(self.values[0, 0])
        fx = 0.0 if len(a) == 1 else float(np.clip((x - a[i]) / (a[i + 1] - a[i]), 0, 1))
        fy = 0.0 if len(b) == 1 else float(np.clip((y - b[j]) / (b[j + 1] - b[j]), 0, 1))
        i1, j1 = min(i + 1, len(a) - 1), min(j + 1, len(b) - 1)
        v = self.values
        return float(
            (1 - fx) * (1 - fy) * v[i, j] + fx * (1 - fy) * v[i1, j] + (1 - fx) * fy * v[i, j1] + fx * fy * v[i1, j1]
        )


@dataclass(eq=False)
class _Op:
    """One occurrence of a timed shape in the model, with how its kept widths follow from a plan."""

    table: _Table
    widths: list[Width]
    keys: list[tuple[int, bool] | None] = field(default_factory=list)  # removal key of each axis (channel axes)


def _with_bias(params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    return params[0], (params[1] if len(params) > 1 else None)


def _no_cheaper_below(values: np.ndarray) -> np.ndarray:
    """Each width costs at most what any larger width costs (per axis): keeping the larger one is always an option,
    and a load spike while timing a small width must not make it look dearer than the full layer."""
    for axis in range(values.ndim):
        values = np.flip(np.minimum.accumulate(np.flip(values, axis), axis=axis), axis)
    return values


def _grid(full: int, step: int, lowest: int, points: int) -> np.ndarray:
    """About `points` kept widths from `lowest` to `full`, multiples of `step` (plus `full` itself)."""
    lowest = max(1, min(lowest, full))
    raw = np.linspace(lowest, full, max(points, 2))
    grid = np.unique(np.clip(np.round(raw / step) * step, lowest, full).astype(int))
    return np.unique(np.append(grid, [lowest, full]))


def _channel(key: tuple[int, bool], full: int) -> Width:
    return lambda plan: full - plan.removed_channels.get(key, 0)


def _heads(group: PrunableGroup, which: int) -> Width:
    """Kept heads (which=0) or kept dims per head (which=1) of an attention group under a plan."""
    heads, dim = group.attention.num_heads, group.attention.head_dim

    def width(plan: Plan) -> int:
        removed = plan.removed.get(group)
        if removed is None or len(removed) == 0:
            return (heads, dim)[which]
        per_head = np.bincount(np.asarray(removed) // dim, minlength=heads)
        kept_rows = per_head < dim
        if which == 0:
            return int(kept_rows.sum())
        return int(dim - (per_head[kept_rows].max() if kept_rows.any() else 0))

    return width


class LatencyModel:
    """Predicted latency (ms per batch) of a plan on this device; see the module docstring."""

    def __init__(
        self,
        ops: list[_Op],
        tables: list[_Table],
        settings: LatencySettings,
        shape_key: dict[str, Any],
        input_shape: tuple[int, ...],
        forward: Callable[[nn.Module, torch.Tensor], Any],
    ):
        self.ops, self.tables, self.settings, self.shape_key = ops, tables, settings, shape_key
        self.input_shape = input_shape  # one image: channels, height, width
        self.forward = forward
        self.scale = 1.0  # prediction = correction x scale x sum of the tables
        self.correction = 1.0
        self.path: Path | None = None
        self.base_ms = 0.0
        self.base_times: list[float] = []
        self.cached = False

    # -- building -------------------------------------------------------------------------------------

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        example: torch.Tensor,
        forward: Callable[[nn.Module, torch.Tensor], Any],
        classes: Sequence[IsomorphicClass],
        cost: CostModel,
        settings: LatencySettings,
        round_to: int,
        min_heads: int,
    ) -> "LatencyModel":
        """Find the width-dependent operations of `model` (one batch-1 forward pass) and their grids."""
        groups = list({id(g): g for c in classes for g in c.groups}.values())
        prunable = {t.key for g in groups for t in g.targets}
        head_groups = {id(g) for c in classes if c.heads for g in c.groups}
        dim_groups = {id(g) for c in classes if not c.heads for g in c.groups}
        builder = _Builder(settings, prunable, round_to, settings.grid_points)
        builder.record(model, example, forward)
        for group in groups:
            if group.attention is not None:
                builder.attention(group, cost, min_heads, id(group) in head_groups, id(group) in dim_groups)
        shape_key = {
            "model": type(model).__name__,
            "input": list(example.shape[1:]),
            "tables": hashlib.sha256("\n".join(sorted(t.key() for t in builder.tables.values())).encode()).hexdigest(),
            "ops": len(builder.ops),
        }
        return cls(builder.ops, list(builder.tables.values()), settings, shape_key, tuple(example.shape[1:]), forward)

    def cache_key(self) -> dict[str, Any]:
        import transformers

        from . import __version__

        s = self.settings
        with s.threads_set():
            machine = describe_machine(s.torch_device)
        return {
            "format": CACHE_FORMAT,
            "machine": machine,
            "device": s.device,
            "batch_size": s.batch_size,
            "dtype": s.dtype,
            "threads": s.threads,
            "repeats": s.repeats,
            "grid_points": s.grid_points,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "optimum_isoprune": __version__,
            },
            "shape": self.shape_key,
        }

    def cache_path(self) -> Path:
        digest = hashlib.sha256(json.dumps(self.cache_key(), sort_keys=True).encode()).hexdigest()[:20]
        return self.settings.cache_folder() / f"{digest}.json"

    def measure(
        self,
        model: nn.Module,
        model_macs: int,
        timer: Timer | None = None,
        disable_tqdm: bool = False,
        previous: "LatencyModel | None" = None,
    ) -> "LatencyModel":
        """Fill the tables (from `previous` or the cache when they match, else by timing) and calibrate them on the
        measured end-to-end latency; warns when timings are noisy."""
        self.path = path = self.cache_path()
        if previous is not None and previous.path == path:
            for mine, theirs in zip(self.tables, previous.tables):
                mine.values = theirs.values
            self.base_times, self.correction, self.cached = previous.base_times, previous.correction, previous.cached
            self._calibrate()
            return self
        if self._load(path):
            self.cached = True
            logger.info("Latency model loaded from %s.", path)
            return self
        s = self.settings
        timer = timer or WallClock(s.torch_device, s.warmup(), s.repeats)
        spreads = []
        total = sum(int(np.prod([len(a) for a in t.axes])) for t in self.tables)
        with (
            s.threads_set(),
            tqdm(
                total=total + 1, desc="Timing layers for the latency model", unit="point", disable=disable_tqdm
            ) as bar,
        ):
            self.base_times = time_model(model, self.forward, self.input_shape, model_macs, s, timer)
            spreads.append(relative_spread(self.base_times))
            bar.update(1)
            for table in self.tables:
                values = np.zeros([len(a) for a in table.axes])
                for index in np.ndindex(*values.shape):
                    widths = tuple(int(table.axes[k][i]) for k, i in enumerate(index))
                    times = timer(table.build(widths))
                    values[index] = statistics.median(times)
                    spreads.append(relative_spread(times))
                    bar.update(1)
                table.values = _no_cheaper_below(values)
        self._calibrate()
        spread = float(np.median(spreads))
        if spread > NOISE_WARNING or relative_spread(self.base_times) > NOISE_WARNING:
            logger.warning(
                "The device looks busy: repeated timings of the same work varied by %.0f%% (median over layers; "
                "%.0f%% for the whole model, interquartile range / median). The latency model and the measured "
                "latency are less reliable; stop other jobs or raise latency_repeats.",
                100 * spread,
                100 * relative_spread(self.base_times),
            )
        self._save(path)
        return self

    def _load(self, path: Path) -> bool:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if data.get("key") != json.loads(json.dumps(self.cache_key())):
            return False
        tables = data.get("tables", {})
        if any(t.key() not in tables for t in self.tables):
            return False
        for t in self.tables:
            t.values = _no_cheaper_below(np.asarray(tables[t.key()], dtype=float).reshape([len(a) for a in t.axes]))
        self.base_times = list(data["base_times"])
        self._calibrate()
        return True

    def _calibrate(self) -> None:
        self.base_ms = statistics.median(self.base_times)
        full = self._sum_tables(None)
        self.scale = self.base_ms / full if full > 0 else 1.0

    def correct(self, plan: Plan, summary: LatencySummary) -> bool:
        """After a first result missed its prediction by more than `CALIBRATION_TOLERANCE` (measured relative to the
        unpruned model timed beside it), scale the predictions by the miss; True when they changed. Not when the
        timings were too noisy to learn from, and only once per run."""
        measured_ms = summary.measured_ms / summary.base_measured_ms * self.base_ms
        predicted_ms = self.predict(plan)
        if self.correction != 1.0 or abs(predicted_ms - measured_ms) <= CALIBRATION_TOLERANCE * measured_ms:
            return False
        if max(summary.measured_spread, summary.base_spread) > NOISE_WARNING:
            logger.warning(
                "The pruned model measured %.4g ms where %.4g ms were predicted, but the timings are too noisy "
                "to correct the latency model with (spread %.0f%%); keeping this result.",
                summary.measured_ms,
                summary.predicted_ms,
                100 * max(summary.measured_spread, summary.base_spread),
            )
            return False
        self.correction = measured_ms / predicted_ms
        return True

    def _save(self, path: Path) -> None:
        data = {
            "key": self.cache_key(),
            "base_times": self.base_times,
            "tables": {t.key(): t.values.ravel().tolist() for t in self.tables},
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as error:
            logger.warning(
                "Could not cache the latency model in %s (%s); it will be measured again next time.", path.parent, error
            )

    # -- using ----------------------------------------------------------------------------------------

    def predict(self, plan: Plan) -> float:
        """Predicted milliseconds per batch of the model pruned by `plan`."""
        return self.correction * self.scale * self._sum_tables(plan)

    def _sum_tables(self, plan: Plan | None) -> float:
        if plan is None:
            return sum(op.table([float(a[-1]) for a in op.table.axes]) for op in self.ops)
        return sum(op.table([w(plan) for w in op.widths]) for op in self.ops)

    def summarize(
        self,
        pruned: nn.Module,
        base: nn.Module,
        plan: Plan,
        macs: tuple[int, int],
        target_ms: float,
        timer: Timer | None = None,
    ) -> LatencySummary:
        """Measure the pruned model end to end next to the unpruned one (alternating, `SIDE_BY_SIDE_ROUNDS` rounds
        each, with the settings of the tables), and compare it with the prediction. `macs`: (pruned, base) per image."""
        s = self.settings
        timer = timer or WallClock(s.torch_device, s.warmup(), s.repeats)
        times: dict[str, list[float]] = {"pruned": [], "base": []}
        for _ in range(SIDE_BY_SIDE_ROUNDS):
            for name, model, count in (("pruned", pruned, macs[0]), ("base", base, macs[1])):
                times[name] += time_model(model, self.forward, self.input_shape, count, s, timer)
        spread = relative_spread(times["pruned"])
        if spread > NOISE_WARNING:
            logger.warning(
                "The device looks busy: the pruned model's timed runs varied by %.0f%% (interquartile "
                "range / median); its measured latency is less reliable.",
                100 * spread,
            )
        with s.threads_set():
            machine, threads = describe_machine(s.torch_device), torch.get_num_threads()
        return LatencySummary(
            target_ms=target_ms,
            predicted_ms=self.predict(plan),
            measured_ms=statistics.median(times["pruned"]),
            base_measured_ms=statistics.median(times["base"]),
            base_predicted_ms=self.predict_base(),
            base_spread=relative_spread(times["base"]),
            correction=self.correction,
            measured_spread=spread,
            batch_size=s.batch_size,
            device=s.device,
            dtype=s.dtype,
            threads=threads,
            machine=machine,
            repeats=len(times["pruned"]),
            cached=self.cached,
            timed_points=sum(int(np.prod([len(a) for a in t.axes])) for t in self.tables),
        )

    def predict_base(self) -> float:
        return self.correction * self.scale * self._sum_tables(None)

    def describe_target(self) -> str:
        """What a latency number of this model refers to, for error messages."""
        s = self.settings
        return f"ms per batch of {s.batch_size} on {s.device} ({s.dtype}, measured on this machine)"

    def round_widths(self, rankings: Sequence[ClassRanking]) -> None:
        """Give each channel class the widths worth keeping: a width no faster than a larger one is dropped.

        For each group, every multiple of its rounding step is priced with the tables (that group's
        layers at that width, the rest of the model whole); kept widths then snap up to the next width
        that is strictly faster than every larger one. Head and head-dim classes keep their rounding.
        """
        for ranking in rankings:
            if ranking.isoclass.heads or any(g.attention is not None for g in ranking.isoclass.groups):
                continue
            ranking.widths = [
                self._efficient_widths(g, int(n), int(k), ranking.round_to)
                for g, n, k in zip(ranking.isoclass.groups, ranking.counts, ranking.min_keep)
            ]

    def _efficient_widths(self, group: PrunableGroup, full: int, floor: int, step: int) -> np.ndarray:
        keys = {t.key: len(t.root_idxs) for t in group.targets}
        touched = [op for op in self.ops if any(k in keys for k in op.keys)]
        candidates = np.unique(np.append(np.arange(max(step, floor), full + 1, step), [floor, full]))
        candidates = candidates[candidates >= max(floor, 1)]
        times = []
        for width in candidates:
            cost = 0.0
            for op in touched:
                widths = []
                for k, axis in zip(op.keys, op.table.axes):
                    full_axis = float(axis[-1])
                    widths.append(full_axis - keys[k] * (full - width) / full if k in keys else full_axis)
                cost += op.table(widths)
            times.append(cost)
        times = np.asarray(times)
        faster_above = np.append(np.minimum.accumulate(times[::-1])[::-1][1:], np.inf)
        return candidates[times < faster_above]


def time_model(
    model: nn.Module,
    forward: Callable[[nn.Module, torch.Tensor], Any],
    input_shape: Sequence[int],
    macs_per_image: int,
    settings: LatencySettings,
    timer: Timer,
) -> list[float]:
    """Timed end-to-end forward passes of `model` on a random batch (a copy when the target device or dtype
    differs from the model's), in eval mode."""
    param = next(model.parameters())
    target = model
    if param.device != settings.torch_device or param.dtype != settings.torch_dtype:
        target = adapter_for(model).copy_model(model).to(device=settings.torch_device, dtype=settings.torch_dtype)
    was_training = target.training
    target.eval()
    x = torch.randn(settings.batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
    x = x.to(device=settings.torch_device, dtype=settings.torch_dtype)
    try:
        with settings.threads_set(), torch.inference_mode():
            return timer(TimedOp("model", (), macs_per_image * settings.batch_size, lambda: forward(target, x)))
    finally:
        target.train(was_training)


class _Builder:
    """Records the width-dependent leaf operations of one forward pass and makes their timing tables."""

    def __init__(self, settings: LatencySettings, prunable: set[tuple[int, bool]], round_to: int, points: int):
        self.s, self.prunable, self.round_to, self.points = settings, prunable, round_to, points
        self.tables: dict[tuple, _Table] = {}
        self.ops: list[_Op] = []

    def _tensor(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(*shape, device=self.s.torch_device).to(self.s.torch_dtype)

    def _cold(self, shapes: list[tuple[int, ...]]) -> Iterator[tuple[torch.Tensor, ...]]:
        """Copies of a layer's parameters, taken in turn, enough of them to outgrow the processor's caches: inside a
        model a layer's weights are evicted by the other layers' before it runs again, so a timing that reuses one
        warm copy makes narrow layers look cheaper than they are."""
        size = sum(int(np.prod(shape)) for shape in shapes) * torch.empty((), dtype=self.s.torch_dtype).element_size()
        count = int(np.clip(np.ceil(COLD_BYTES / max(size, 1)), 1, MAX_COPIES))
        device, dtype = self.s.torch_device, self.s.torch_dtype
        return itertools.cycle(
            [tuple(torch.full(shape, 0.01, device=device, dtype=dtype) for shape in shapes) for _ in range(count)]
        )

    def _table(
        self, kind: str, signature: tuple, axes: list[np.ndarray], build: Callable[[tuple[int, ...]], TimedOp]
    ) -> _Table:
        key = (kind, signature, tuple(len(a) for a in axes))
        if key not in self.tables:
            self.tables[key] = _Table(kind, signature, axes, build)
        return self.tables[key]

    def _axis(self, key: tuple[int, bool], full: int) -> tuple[np.ndarray, Width, tuple[int, bool] | None]:
        if key in self.prunable:
            return _grid(full, self.round_to, self.round_to, self.points), _channel(key, full), key
        return np.array([full]), (lambda plan, full=full: full), None

    def record(self, model: nn.Module, example: torch.Tensor, forward: Callable) -> None:
        leaves = [m for m in model.modules() if not list(m.children())]
        calls: list[tuple[nn.Module, tuple[int, ...], tuple[int, ...]]] = []

        def hook(module, inputs, output):
            if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                calls.append((module, tuple(inputs[0].shape), tuple(output.shape)))

        handles = [m.register_forward_hook(hook) for m in leaves]
        with hooks_removed(handles), torch.no_grad():
            forward(model, example)
        last: tuple[tuple[int, ...], int, tuple[int, bool], int] | None = None  # output shape, channel dim, key, full
        for module, shape_in, shape_out in calls:
            produced = self._leaf(module, shape_in, shape_out, last)
            if produced is not None:
                last = produced

    def _leaf(self, m: nn.Module, shape_in, shape_out, last):
        b = self.s.batch_size
        if isinstance(m, nn.Linear):
            rows = int(np.prod(shape_in[:-1])) * b
            ax_in, w_in, k_in = self._axis((id(m), False), m.in_features)
            ax_out, w_out, k_out = self._axis((id(m), True), m.out_features)
            bias = m.bias is not None

            def build(w, rows=rows, bias=bias):
                x = self._tensor((rows, w[0]))
                params = self._cold([(w[1], w[0])] + ([(w[1],)] if bias else []))
                return TimedOp("linear", w, rows * w[0] * w[1], lambda: F.linear(x, *next(params)))

            table = self._table("linear", (rows, m.in_features, m.out_features, bias), [ax_in, ax_out], build)
            self.ops.append(_Op(table, [w_in, w_out], [k_in, k_out]))
            return shape_out, len(shape_out) - 1, (id(m), True), m.out_features
        if isinstance(m, nn.Conv2d) and len(shape_in) == 4:
            return self._conv(m, shape_in, shape_out, b)
        if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            key = next((k for k in ((id(m), True), (id(m), False)) if k in self.prunable), None)
            return self._norm(m, key, shape_in, b) if key is not None else None
        if (
            not isinstance(m, (nn.Identity, nn.Dropout))
            and not any(True for _ in m.parameters(recurse=False))
            and last is not None
            and shape_in == last[0]
            and shape_out == shape_in
        ):
            self._elementwise(m, shape_in, last, b)
        return None

    def _conv(self, m: nn.Conv2d, shape_in, shape_out, b):
        _, _, h, w_ = shape_in
        h_out, w_out = shape_out[-2:]
        spec = (m.kernel_size, m.stride, m.padding, m.dilation)
        bias = m.bias is not None
        depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        if depthwise:
            keys = [k for k in ((id(m), False), (id(m), True)) if k in self.prunable]
            axis, _, _ = self._axis(keys[0] if keys else (id(m), True), m.out_channels)

            def width(plan, keys=keys, full=m.out_channels):
                return full - max((plan.removed_channels.get(k, 0) for k in keys), default=0)

            def build(w, kernel=m.kernel_size):
                c = w[0]
                x = self._tensor((b, c, h, w_))
                params = self._cold([(c, 1, *kernel), (c,)] if bias else [(c, 1, *kernel)])
                macs = b * h_out * w_out * c * kernel[0] * kernel[1]
                return TimedOp(
                    "depthwise",
                    w,
                    macs,
                    lambda: F.conv2d(x, *_with_bias(next(params)), m.stride, m.padding, m.dilation, c),
                )

            table = self._table("depthwise", (b, h, w_, m.out_channels, spec, bias), [axis], build)
            self.ops.append(_Op(table, [width], [keys[0] if keys else None]))
            return shape_out, 1, (id(m), True), m.out_channels
        if m.groups != 1:
            return None  # grouped convolutions stay in the measured overhead
        ax_in, w_in, k_in = self._axis((id(m), False), m.in_channels)
        ax_out, w_o, k_out = self._axis((id(m), True), m.out_channels)

        def build(w, kernel=m.kernel_size):
            x = self._tensor((b, w[0], h, w_))
            params = self._cold([(w[1], w[0], *kernel), (w[1],)] if bias else [(w[1], w[0], *kernel)])
            macs = b * h_out * w_out * w[1] * w[0] * kernel[0] * kernel[1]
            return TimedOp(
                "conv", w, macs, lambda: F.conv2d(x, *_with_bias(next(params)), m.stride, m.padding, m.dilation)
            )

        table = self._table("conv", (b, h, w_, m.in_channels, m.out_channels, spec, bias), [ax_in, ax_out], build)
        self.ops.append(_Op(table, [w_in, w_o], [k_in, k_out]))
        return shape_out, 1, (id(m), True), m.out_channels

    def _norm(self, m: nn.Module, key: tuple[int, bool], shape_in, b):
        if isinstance(m, nn.LayerNorm):
            full = int(m.normalized_shape[-1])
            rows = int(np.prod(shape_in)) // full * b
            axis, width, _ = self._axis(key, full)

            def build(w, rows=rows):
                x, weight, bias_t = self._tensor((rows, w[0])), self._tensor((w[0],)), self._tensor((w[0],))
                return TimedOp("layer_norm", w, rows * w[0], lambda: F.layer_norm(x, (w[0],), weight, bias_t))

            table = self._table("layer_norm", (rows, full), [axis], build)
            channel_dim = len(shape_in) - 1 if shape_in[-1] == full else 1
        else:
            full, (h, w_) = m.num_features, shape_in[-2:]
            axis, width, _ = self._axis(key, full)

            def build(w):
                x = self._tensor((b, w[0], h, w_))
                mean, var = self._tensor((w[0],)), self._tensor((w[0],)).abs() + 1
                return TimedOp(
                    "batch_norm", w, b * w[0] * h * w_, lambda: F.batch_norm(x, mean, var, mean, var, False, 0.0, 1e-5)
                )

            table = self._table("batch_norm", (b, h, w_, full), [axis], build)
            channel_dim = 1
        self.ops.append(_Op(table, [width], [key]))
        return tuple(shape_in), channel_dim, key, full

    def _elementwise(self, m: nn.Module, shape_in, last, b):
        """A parameter-free module (activation, dropout) on the output of the last width-dependent op."""
        _, channel_dim, key, full = last
        if key not in self.prunable:
            return
        axis, width, _ = self._axis(key, full)
        shape = list(shape_in)
        shape[0] *= b

        def build(w, shape=tuple(shape)):
            s = list(shape)
            s[channel_dim] = w[0]
            x = self._tensor(s)
            return TimedOp("elementwise", w, int(np.prod(s)), lambda: m(x))

        table = self._table("elementwise", (type(m).__name__, tuple(shape), channel_dim), [axis], build)
        self.ops.append(_Op(table, [width], [key]))

    def attention(
        self, group: PrunableGroup, cost: CostModel, min_heads: int, heads_prunable: bool, dims_prunable: bool
    ) -> None:
        """The attention product (scaled dot-product attention) of one attention group: heads x dims per head."""
        att = group.attention
        tokens, keys = next((t, k) for a, t, k in cost.attentions if a.module is att.module)
        rows = self.s.batch_size * max(tokens // max(keys, 1), 1)
        heads = _grid(att.num_heads, 1, min_heads, self.points) if heads_prunable else np.array([att.num_heads])
        dims = (
            _grid(att.head_dim, self.round_to, self.round_to, self.points)
            if dims_prunable
            else np.array([att.head_dim])
        )

        def build(w, rows=rows, seq=keys):
            q, k, v = (self._tensor((rows, w[0], seq, w[1])) for _ in range(3))
            return TimedOp(
                "attention", w, 2 * rows * w[0] * seq * seq * w[1], lambda: F.scaled_dot_product_attention(q, k, v)
            )

        table = self._table("attention", (rows, keys, att.num_heads, att.head_dim), [heads, dims], build)
        self.ops.append(_Op(table, [_heads(group, 0), _heads(group, 1)], [None, None]))


def build_latency_model(
    model: nn.Module,
    example: torch.Tensor,
    forward: Callable[[nn.Module, torch.Tensor], Any],
    classes: Sequence[IsomorphicClass],
    cost: CostModel,
    config: Any,
    macs_per_image: int,
    timer: Timer | None = None,
    previous: LatencyModel | None = None,
) -> LatencyModel:
    """The latency model of `model` for a config's `latency_*` settings, measured (or read from the cache)."""
    settings = LatencySettings(
        batch_size=config.latency_batch_size,
        device=config.latency_device or str(example.device),
        dtype=config.latency_dtype,
        threads=config.latency_threads,
        grid_points=config.latency_grid_points,
        repeats=config.latency_repeats,
        cache_dir=config.latency_cache_dir,
    )
    device = settings.torch_device
    available = {
        "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
        "mps": torch.backends.mps.is_available(),
    }.get(device.type, True)
    if not available:
        raise ConfigurationError(
            f"latency_device={settings.device!r} but that device is not available here; measure on the "
            "device you deploy to, or use latency_device='cpu'."
        )
    latency = LatencyModel.from_model(
        model, example, forward, classes, cost, settings, config.round_to, config.min_heads
    )
    return latency.measure(model, macs_per_image, timer, previous=previous)
