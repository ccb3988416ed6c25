"""`PruningReport`: what a pruning run did, measured (MACs, params, widths, time)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from .serialization import JsonFile

REPORT_NAME = "pruning_report.json"


@dataclass
class LayerWidth:
    """Width of one prunable structure before and after pruning.

    `kind` is one of "heads", "head_dim", "mlp", "channels", "residual"; `name` is the module
    that holds it (e.g. "vit.encoder.layer.3.attention").
    """

    name: str
    kind: str
    before: int
    after: int


@dataclass
class ClassAmount:
    """How much one isomorphic class lost: channels (or heads) before and after, over all its groups."""

    name: str
    num_groups: int
    before: int
    after: int

    @property
    def ratio(self) -> float:
        return 1.0 - self.after / self.before if self.before else 0.0


@dataclass
class PruningReport(JsonFile):
    """Before/after numbers of one pruning run; saved as `pruning_report.json` beside the checkpoint."""

    file_name: ClassVar[str] = REPORT_NAME

    base_model: str | None
    architecture: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    image_size: int
    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None  # ms per batch; `latency` says of which batch, device and machine
    # Achieved fractions removed: channels outside attention, whole heads, and dims inside heads.
    pruning_ratio: float = 0.0
    head_pruning_ratio: float = 0.0
    head_dim_pruning_ratio: float = 0.0
    classes: list[ClassAmount] = field(default_factory=list)
    layers: list[LayerWidth] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float | None = None  # CUDA allocator peak during pruning; on CPU the process's peak RSS
    reconstruction: dict[str, Any] = field(default_factory=dict)  # a ReconstructionSummary, when one ran
    search: dict[str, Any] = field(default_factory=dict)  # a SearchSummary, for budget_policy="search"
    latency: dict[str, Any] = field(default_factory=dict)  # a LatencySummary, for target_latency
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    @property
    def target_error(self) -> float | None:
        """Relative distance of the achieved MACs/params (measured latency) from the target (None for a plain ratio)."""
        if self.target_latency is not None and self.latency:
            return abs(self.latency["measured_ms"] - self.target_latency) / self.target_latency
        if self.target_macs is not None:
            return abs(self.macs_after - self.target_macs) / self.target_macs
        if self.target_params is not None:
            return abs(self.params_after - self.target_params) / self.target_params
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningReport":
        data = dict(data)
        data["classes"] = [ClassAmount(**c) for c in data.get("classes", [])]
        data["layers"] = [LayerWidth(**w) for w in data.get("layers", [])]
        return cls(**data)

    def summary(self) -> str:
        """A short human-readable table of the run."""
        rows = [
            ("MACs", format_count(self.macs_before), format_count(self.macs_after), f"{self.macs_ratio:.3f}"),
            ("Params", format_count(self.params_before), format_count(self.params_after), f"{self.params_ratio:.3f}"),
        ]
        lines = [f"{'':8}{'before':>14}{'after':>14}{'ratio':>8}"]
        lines += [f"{n:8}{b:>14}{a:>14}{r:>8}" for n, b, a, r in rows]
        for c in self.classes:
            lines.append(
                f"  class {c.name}: {c.before} -> {c.after} ({c.ratio:.1%} removed, {c.num_groups} group{'s' if c.num_groups != 1 else ''})"
            )
        if self.reconstruction.get("mode", "none") != "none":
            from .reconstruction import ReconstructionSummary

            lines.append("  reconstruction: " + ReconstructionSummary(**self.reconstruction).describe())
        if self.search:
            from .search import SearchSummary

            lines.append("  split: " + SearchSummary(**self.search).describe())
        if self.latency:
            from .latency_model import LatencySummary

            lines.append("  latency: " + LatencySummary(**self.latency).describe())
        if self.target_error is not None:
            lines.append(f"  target error: {self.target_error:.2%}")
        if self.timings:
            lines.append("  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        if self.peak_memory_mb is not None:
            lines.append(f"  peak memory: {self.peak_memory_mb:.0f} MB")
        return "\n".join(lines)


def format_count(count: float) -> str:
    """A count with a unit suffix for tables and logs: 1234567 -> '1.235 M'."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.3f} {unit}"
    return f"{count:.0f}"
