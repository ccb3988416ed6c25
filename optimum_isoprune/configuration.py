"""`IsomorphicPruningConfig`: what to prune, how much, and how to rank it."""

from __future__ import annotations

import difflib
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from .errors import ConfigurationError
from .serialization import JsonFile

PRUNING_CONFIG_NAME = "pruning_config.json"

IMPORTANCE_CHOICES = ("taylor", "magnitude", "random")
GROUPING_CHOICES = ("isomorphic", "global", "uniform")
BUDGET_POLICY_CHOICES = ("shared", "allocate", "search")
RECONSTRUCTION_CHOICES = ("none", "bias", "least_squares")
LATENCY_DTYPE_CHOICES = ("float32", "float16", "bfloat16")
TARGETS = ("target_macs", "target_params", "target_latency", "pruning_ratio")
SEED_LIMIT = 2**32  # numpy's and `transformers.set_seed`'s range; torch and datasets take it too


@dataclass
class IsomorphicPruningConfig(JsonFile):
    """Configuration of one pruning run; exactly one of `target_macs`, `target_params`, `target_latency`,
    `pruning_ratio`."""

    file_name: ClassVar[str] = PRUNING_CONFIG_NAME

    target_macs: float | None = field(
        default=None, metadata={"help": "MACs of the pruned model for one image (e.g. 1.2e9)."}
    )
    target_params: float | None = field(
        default=None, metadata={"help": "Parameter count of the pruned model (e.g. 5e6)."}
    )
    target_latency: float | None = field(
        default=None,
        metadata={
            "help": "Latency of the pruned model in milliseconds per batch of latency_batch_size on "
            "latency_device, predicted by a latency model measured on this machine (e.g. 20.0)."
        },
    )
    latency_batch_size: int = field(
        default=1, metadata={"help": "target_latency: the batch size the latency refers to."}
    )
    latency_device: str | None = field(
        default=None,
        metadata={
            "help": "target_latency: the device it refers to ('cpu', 'cuda', 'cuda:1'); defaults to the model's device."
        },
    )
    latency_threads: int | None = field(
        default=None,
        metadata={"help": "target_latency: CPU threads it refers to; defaults to torch's current setting."},
    )
    latency_dtype: str = field(
        default="float32",
        metadata={"help": "target_latency: the inference dtype it refers to.", "choices": LATENCY_DTYPE_CHOICES},
    )
    latency_grid_points: int = field(
        default=6,
        metadata={
            "help": "target_latency: kept widths timed per layer shape (a coarse grid of multiples of "
            "round_to, interpolated in between)."
        },
    )
    latency_repeats: int = field(
        default=10,
        metadata={
            "help": "target_latency: timed runs per measurement (the median counts), after a quarter as "
            "many warm-up runs."
        },
    )
    latency_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "target_latency: folder of cached latency measurements; defaults to "
            "$OPTIMUM_ISOPRUNE_CACHE/latency or ~/.cache/optimum_isoprune/latency."
        },
    )
    pruning_ratio: float | None = field(
        default=None,
        metadata={"help": "Fraction of channels removed in every isomorphic class, in [0, 1)."},
    )
    prune_heads: bool = field(
        default=True, metadata={"help": "Remove whole attention heads (ranked against all heads)."}
    )
    prune_head_dims: bool = field(
        default=True, metadata={"help": "Remove dimensions inside heads (same count in every head of a layer)."}
    )
    head_pruning_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of heads removed; defaults to the solved channel ratio."}
    )
    head_dim_pruning_ratio: float | None = field(
        default=None, metadata={"help": "Fraction of head dims removed; defaults to the solved channel ratio."}
    )
    importance: str = field(
        default="taylor",
        metadata={
            "help": "Importance criterion; taylor needs calibration data (magnitude is used without).",
            "choices": IMPORTANCE_CHOICES,
        },
    )
    grouping: str = field(
        default="isomorphic",
        metadata={
            "help": "Ranking scope: 'isomorphic' (the paper), 'global' (all groups ranked together) "
            "or 'uniform' (every layer pruned by the same ratio).",
            "choices": GROUPING_CHOICES,
        },
    )
    budget_policy: str = field(
        default="shared",
        metadata={
            "help": "How a MACs/params target is split across classes: 'shared' (one ratio for every "
            "class, the paper's behaviour), 'search' (per-class amounts searched on the distillation loss "
            "of held-out calibration batches, starting from shared and global ranking's amounts) or "
            "'allocate' (deprecated: importance normalised by its class median, per MAC saved; the worst "
            "split after finetuning in BENCHMARKS.md part 6). Ranking stays within classes.",
            "choices": BUDGET_POLICY_CHOICES,
        },
    )
    reconstruction: str = field(
        default="least_squares",
        metadata={
            "help": "Recovery after surgery, on the calibration data: 'least_squares' refits every layer whose "
            "inputs lost channels to the unpruned model's outputs (closed form, no training), 'bias' refits "
            "only their biases and re-estimates BatchNorm statistics, 'none' keeps the sliced weights.",
            "choices": RECONSTRUCTION_CHOICES,
        },
    )
    reconstruction_damping: float = field(
        default=1e-2,
        metadata={
            "help": "Ridge strength of the least-squares refit, relative to the mean input energy; it pulls "
            "each layer toward its pruned weights (0 = exact least squares)."
        },
    )
    search_candidates: int = field(
        default=24,
        metadata={
            "help": "budget_policy='search': candidate splits scored (each costs one forward pass over "
            "the held-out calibration batches)."
        },
    )
    search_finalists: int | None = field(
        default=None,
        metadata={
            "help": "budget_policy='search' with reconstruction: None scores every candidate after "
            "reconstruction; a number N ranks candidates without it (one forward pass each, several times "
            "faster) and rescores only the starts and the N best others after reconstruction (as good at "
            "50% of the MACs, worse at 25% in BENCHMARKS.md part 6)."
        },
    )
    search_batches: int = field(
        default=2,
        metadata={
            "help": "budget_policy='search': calibration batches held out to score splits (taken after the "
            "num_calibration_batches used for importance and reconstruction)."
        },
    )
    round_to: int = field(
        default=8, metadata={"help": "Kept widths are multiples of this (hardware-friendly); 1 disables."}
    )
    min_heads: int = field(default=1, metadata={"help": "Heads kept at least in every attention layer."})
    num_calibration_batches: int = field(
        default=8, metadata={"help": "Calibration batches used to estimate Taylor importance."}
    )
    calibration_batch_size: int = field(
        default=16, metadata={"help": "Batch size when the calibration data is a dataset or tensor."}
    )
    ignored_modules: list[str] = field(
        default_factory=list,
        metadata={"help": "Names (or name suffixes) of modules whose output channels must stay whole."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for data order and random importance, in [0, 2**32)."})
    image_size: int | None = field(
        default=None, metadata={"help": "Input resolution; taken from the model config when omitted."}
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), str(f.type))
        given = [k for k in TARGETS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigurationError(
                f"Set exactly one of {', '.join(TARGETS)} (got {given or 'none'}); "
                "e.g. IsomorphicPruningConfig(target_macs=1.2e9)."
            )
        for name in ("target_macs", "target_params", "target_latency"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigurationError(f"{name} must be a positive number, got {value!r}.")
        for name in ("pruning_ratio", "head_pruning_ratio", "head_dim_pruning_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigurationError(f"{name} must be in [0, 1), got {value!r}.")
        for f in fields(self):
            if "choices" in f.metadata:
                _check_choice(f.name, getattr(self, f.name), f.metadata["choices"])
        if self.budget_policy == "allocate":
            warnings.warn(
                "budget_policy='allocate' is deprecated and will be removed: it gave the worst or second-worst "
                "top-1 after finetuning on every teacher measured (BENCHMARKS.md part 6). Use 'shared' (the "
                "default) or 'search'.",
                FutureWarning,
                stacklevel=3,
            )
        if self.latency_device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.latency_device):
            raise ConfigurationError(
                f"latency_device must be 'cpu', 'cuda', 'cuda:<index>' or 'mps', got {self.latency_device!r}."
            )
        if not self.reconstruction_damping >= 0:
            raise ConfigurationError(f"reconstruction_damping must be >= 0, got {self.reconstruction_damping!r}.")
        for name in (
            "round_to",
            "min_heads",
            "num_calibration_batches",
            "calibration_batch_size",
            "search_candidates",
            "search_batches",
            "latency_batch_size",
            "latency_repeats",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name} must be a positive integer, got {value!r}.")
        if self.search_finalists is not None and (
            not isinstance(self.search_finalists, int) or self.search_finalists < 0
        ):
            raise ConfigurationError(
                f"search_finalists must be None or a non-negative integer, got {self.search_finalists!r}."
            )
        if self.latency_threads is not None and self.latency_threads < 1:
            raise ConfigurationError(f"latency_threads must be a positive integer, got {self.latency_threads!r}.")
        if self.latency_grid_points < 2:
            raise ConfigurationError(f"latency_grid_points must be at least 2, got {self.latency_grid_points!r}.")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ConfigurationError(f"seed must be in [0, 2**32), got {self.seed!r}.")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigurationError(f"image_size must be positive, got {self.image_size!r}.")
        self.ignored_modules = list(self.ignored_modules)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "IsomorphicPruningConfig":
        if not isinstance(data, Mapping):
            raise ConfigurationError(
                f"IsomorphicPruningConfig.from_dict takes a mapping of field names to values, got "
                f"{type(data).__name__}; e.g. from_dict({{'pruning_ratio': 0.5}})."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            close = {name: difflib.get_close_matches(str(name), known, n=1) for name in unknown}
            hints = "".join(f" {name!r}: did you mean {match[0]!r}?" for name, match in close.items() if match)
            raise ConfigurationError(
                f"Unknown IsomorphicPruningConfig fields {unknown}.{hints} Known fields: {sorted(known)}."
            )
        return cls(**data)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigurationError(f"Unknown {name} {value!r}; choose one of {list(choices)}.")


def _check_type(name: str, value: Any, annotation: str) -> None:
    """`bool` fields take bools, `int` fields ints, `float` fields finite numbers, `list[str]` a list of strings."""
    optional = annotation.endswith("| None")
    kind = annotation.removesuffix("| None").strip()
    if value is None and optional:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {
        "bool": isinstance(value, bool),
        "int": number and isinstance(value, int),
        "float": number and math.isfinite(value),
        "str": isinstance(value, str),
        "list[str]": isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value),
    }.get(kind, True)
    if not ok:
        expected = {
            "bool": "True or False",
            "int": "an integer",
            "float": "a finite number",
            "str": "a string",
            "list[str]": "a list of module names, e.g. ['classifier']",
        }[kind]
        raise ConfigurationError(
            f"IsomorphicPruningConfig.{name} must be {expected}{' or None' if optional else ''}, "
            f"got {value!r:.60} ({type(value).__name__})."
        )
