"""Latency (and accuracy) of one model across runtimes: PyTorch eager, onnxruntime fp32 / int8, OpenVINO.

Runtimes are timed side by side: every round runs each of them once on the same input, in a rotating
order, and each gets the median of its rounds, so a machine that gets busier or quieter during the
measurement moves every runtime alike. The result is the `deployment=` input of
`optimum_isoprune.hub.create_model_card` (and `deployment.json` beside the ONNX files).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .adapters import get_adapter
from .export import ONNX_NAME, evaluate_onnx, onnx_file_bytes, runner
from .latency import describe_machine
from .quantization import QUANTIZATION_MODES, quantized_file_name

__all__ = ["measure_side_by_side", "benchmark_deployment", "DEPLOYMENT_NAME"]

DEPLOYMENT_NAME = "deployment.json"


def measure_side_by_side(
    runners: Mapping[str, Callable[[], Any]], rounds: int = 10, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Median / min wall-clock ms of each zero-argument callable, timed in interleaved rounds.

    Each round calls every runner once, starting one further along the list than the round before.
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}.")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}.")
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            start = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {n: {"median_ms": statistics.median(t), "min_ms": min(t), "rounds": rounds} for n, t in times.items()}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _pytorch_bytes(model: nn.Module, checkpoint_dir: str | None) -> int:
    if checkpoint_dir:
        from .card import checkpoint_size

        size = checkpoint_size(checkpoint_dir)
        if size is not None:
            return size
    return sum(p.numel() * p.element_size() for p in model.parameters())


def benchmark_deployment(
    model: nn.Module,
    export_dir: str | os.PathLike,
    batch_sizes: Sequence[int] = (1, 32),
    threads: int | None = None,
    rounds: int | Mapping[int, int] = 10,
    warmup: int = 2,
    eval_dataset: Any = None,
    openvino: bool | None = None,
    checkpoint_dir: str | None = None,
    save: bool = True,
) -> dict[str, Any]:
    """Time `model` in PyTorch and every ONNX file `export_onnx` / `quantize_onnx` wrote into `export_dir`.

    Rows: PyTorch eager fp32, onnxruntime fp32 / int8 dynamic / int8 static (the files present), and
    OpenVINO fp32 / int8 static when `openvino` (default: when it is installed). `rounds` may be a dict
    {batch size: rounds}. With `eval_dataset` (a dataset of `pixel_values` / `labels`), each row's top-1
    is measured on it. Saves `deployment.json` into `export_dir` when `save`.
    """
    export_dir = os.fspath(export_dir)
    fp32 = os.path.join(export_dir, ONNX_NAME)
    if not os.path.isfile(fp32):
        raise FileNotFoundError(f"No {ONNX_NAME} in {export_dir!r}: export the model first (export_onnx).")
    if openvino is None:
        openvino = _openvino_available()
    files = {"fp32": fp32}
    for mode in QUANTIZATION_MODES:
        path = os.path.join(export_dir, quantized_file_name(mode))
        if os.path.isfile(path):
            files[mode] = path
    adapter = get_adapter(model)
    size, channels = adapter.image_size(), adapter.num_channels()
    rows: list[dict[str, Any]] = [
        {
            "key": "pytorch",
            "format": "PyTorch (safetensors)",
            "runtime": f"PyTorch {torch.__version__.split('+')[0]} eager",
            "precision": "fp32",
            "file": None,
            "file_bytes": _pytorch_bytes(model, checkpoint_dir),
        }
    ]
    ort_version, ov_version = _version("onnxruntime"), _version("openvino")
    precision = {"fp32": "fp32", "int8-dynamic": "int8 dynamic", "int8-static": "int8 static"}
    for mode, path in files.items():
        rows.append(
            {
                "key": f"onnxruntime-{mode}",
                "format": "ONNX",
                "runtime": f"onnxruntime {ort_version}",
                "precision": precision[mode],
                "file": os.path.basename(path),
                "file_bytes": onnx_file_bytes(path),
            }
        )
    if openvino:
        for mode in ("fp32", "int8-static"):
            if mode in files:
                rows.append(
                    {
                        "key": f"openvino-{mode}",
                        "format": "ONNX",
                        "runtime": f"OpenVINO {ov_version}",
                        "precision": precision[mode],
                        "file": os.path.basename(files[mode]),
                        "file_bytes": onnx_file_bytes(files[mode]),
                    }
                )

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    machine = describe_machine()
    try:
        calls: dict[str, Callable[[np.ndarray], Any]] = {}
        for row in rows:
            if row["key"] == "pytorch":
                calls["pytorch"] = _torch_call(model, adapter)
            else:
                runtime, mode = row["key"].split("-", 1)
                calls[row["key"]] = runner(files[mode], runtime=runtime, threads=threads)
        for row in rows:
            row["latency_ms"] = {}
        for batch_size in batch_sizes:
            pixels = torch.randn(batch_size, channels, size, size, generator=torch.Generator().manual_seed(0)).numpy()
            n = rounds.get(batch_size, 10) if isinstance(rounds, Mapping) else rounds
            measured = measure_side_by_side(
                {k: (lambda f=f: f(pixels)) for k, f in calls.items()}, rounds=n, warmup=warmup
            )
            for row in rows:
                row["latency_ms"][str(batch_size)] = round(measured[row["key"]]["median_ms"], 3)
        if eval_dataset is not None:
            from .metrics import evaluate_model

            for row in rows:
                if row["key"] == "pytorch":
                    result = evaluate_model(model, eval_dataset, disable_tqdm=True)
                else:
                    runtime, mode = row["key"].split("-", 1)
                    result = evaluate_onnx(files[mode], eval_dataset, runtime=runtime, threads=threads)
                row["top1"] = result["top1"]
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
    result = {
        "machine": machine,
        "threads": threads or previous_threads,
        "batch_sizes": [int(b) for b in batch_sizes],
        "rounds": dict(rounds) if isinstance(rounds, Mapping) else rounds,
        "warmup": warmup,
        "input_shape": [channels, size, size],
        "eval_examples": len(eval_dataset) if eval_dataset is not None else None,
        "rows": rows,
    }
    if save:
        with open(os.path.join(export_dir, DEPLOYMENT_NAME), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


def _torch_call(model: nn.Module, adapter: Any) -> Callable[[np.ndarray], Any]:
    def call(pixels: np.ndarray) -> Any:
        with torch.inference_mode():
            return adapter.logits(model, torch.from_numpy(pixels))

    return call
