"""Shared helpers of the benchmark scripts: machine / version stamp, JSON results, figure footers."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = HERE / ".cache"
RESULTS.mkdir(exist_ok=True)
CACHE.mkdir(exist_ok=True)
sys.path.insert(0, str(HERE.parent))


def machine() -> dict:
    import timm
    import torch
    import torch_pruning
    import transformers

    import optimum_isoprune
    from optimum_isoprune.latency import describe_machine

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "machine": describe_machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "torch_pruning": getattr(torch_pruning, "__version__", "?"),
        "optimum_isoprune": optimum_isoprune.__version__,
        "load_average_1min_at_start": load,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def stamp(meta: dict, seed) -> str:
    """One line for a figure footer: machine, versions, seed."""
    return (
        f"{meta['machine']} | transformers {meta['transformers']}, timm {meta['timm']}, "
        f"torch-pruning {meta['torch_pruning']}, optimum-isoprune {meta['optimum_isoprune']} | seed {seed}"
    )


def footer(fig, meta: dict, seed) -> None:
    fig.text(0.01, 0.005, stamp(meta, seed), fontsize=6, color="0.35", ha="left", va="bottom")


def save_json(name: str, payload: dict) -> Path:
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1, sort_keys=False, default=float) + "\n")
    print(f"wrote {path.relative_to(HERE.parent)}")
    return path


def median(xs):
    return statistics.median(xs)
