"""Inference latency of a vision model, measured the same way before and after pruning.

The numbers end up in the model card, so every result carries the batch size, the input shape and a
description of the machine that produced it: a latency without its machine means nothing.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any

import torch

__all__ = ["measure_latency", "compare_latency", "describe_machine"]


def describe_machine(device: torch.device | str | None = None) -> str:
    """One line naming the processor, its cores, the torch threads and the torch version.

    e.g. ``"AMD EPYC (CPU), 2 cores, 2 torch threads, torch 2.14.1"``; for a CUDA device the GPU name.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return (
        f"{_cpu_model()} (CPU), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _input_shape(image_size: int | tuple[int, int], num_channels: int, batch_size: int) -> tuple[int, ...]:
    if isinstance(image_size, int):
        height = width = image_size
    else:
        height, width = image_size
    for name, value in (
        ("image_size", height),
        ("image_size", width),
        ("num_channels", num_channels),
        ("batch_size", batch_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer (or a (height, width) pair), got {value!r}.")
    return (batch_size, num_channels, height, width)


@torch.inference_mode()
def measure_latency(
    model: torch.nn.Module,
    image_size: int | tuple[int, int],
    num_channels: int = 3,
    batch_size: int = 1,
    repeats: int = 30,
    warmup: int = 5,
) -> dict[str, Any]:
    """Median wall-clock time of one forward pass on a random batch, under `torch.inference_mode`.

    The model runs on the device and dtype of its parameters, in eval mode (its training flag is
    restored afterwards). Returns ``{"median_ms", "mean_ms", "min_ms", "per_image_ms", "batch_size",
    "input_shape", "repeats", "warmup", "device", "machine"}``: `median_ms` is for the whole batch.
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}.")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}.")
    shape = _input_shape(image_size, num_channels, batch_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    pixel_values = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(pixel_values)
        sync()
        times_ms = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(pixel_values)
            sync()
            times_ms.append((time.perf_counter() - start) * 1e3)
    finally:
        model.train(was_training)

    median_ms = statistics.median(times_ms)
    return {
        "median_ms": median_ms,
        "mean_ms": statistics.fmean(times_ms),
        "min_ms": min(times_ms),
        "per_image_ms": median_ms / batch_size,
        "batch_size": batch_size,
        "input_shape": list(shape),
        "repeats": repeats,
        "warmup": warmup,
        "device": str(device),
        "machine": describe_machine(device),
    }


def compare_latency(
    base_model: torch.nn.Module,
    pruned_model: torch.nn.Module,
    image_size: int | tuple[int, int],
    num_channels: int = 3,
    batch_size: int = 1,
    repeats: int = 30,
    warmup: int = 5,
) -> dict[str, dict[str, Any]]:
    """Latency of the base and the pruned model with the same settings on this machine.

    Returns ``{"before": ..., "after": ...}`` (each from `measure_latency`), the shape that
    `optimum_isoprune.hub.create_model_card(latency=...)` expects.
    """
    kwargs = dict(
        image_size=image_size, num_channels=num_channels, batch_size=batch_size, repeats=repeats, warmup=warmup
    )
    return {"before": measure_latency(base_model, **kwargs), "after": measure_latency(pruned_model, **kwargs)}
