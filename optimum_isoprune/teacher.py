"""The frozen teacher's forward pass during distillation: in a cheaper dtype / memory layout, compiled, and timed.

Under random augmentation (RandAugment, mixup / cutmix) the teacher must see every step's pixels, so its logits
cannot be cached and its forward pass is part of every step. `TeacherRunner` makes that pass cheap where the
hardware allows (bf16 / fp16 weights, channels_last, `torch.compile`), and `StepTimeCallback` reports which share of
the training step it takes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .adapters import adapter_for
from .adapters.io import output_logits

logger = logging.getLogger(__name__)

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TeacherRunner:
    """Calls a frozen teacher and returns float32 logits; accumulates the seconds spent in it.

    `dtype` casts the teacher's weights and inputs (bf16 halves its memory traffic on GPUs and recent CPUs);
    `channels_last` suits convolutional teachers; `compile` wraps it in `torch.compile` and falls back to eager mode,
    with a warning, when compilation fails (no compiler on the machine, an unsupported operator).
    """

    def __init__(
        self, teacher: nn.Module, dtype: str = "float32", channels_last: bool = False, compile: bool = False
    ) -> None:
        if dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher dtype {dtype!r} is not one of {sorted(TEACHER_DTYPES)}.")
        self.teacher = teacher
        self.dtype = TEACHER_DTYPES[dtype]
        self.channels_last = channels_last
        teacher.requires_grad_(False)
        teacher.eval()
        if self.dtype != torch.float32:
            teacher.to(self.dtype)
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
        self.io = adapter_for(teacher)  # the calling convention (transformers keyword / timm positional)
        self._forward: nn.Module = teacher
        self._compiled = False
        if compile:
            if hasattr(torch, "compile"):
                self._forward, self._compiled = torch.compile(teacher), True
            else:
                logger.warning("teacher_compile=True but this torch has no torch.compile; running the teacher eagerly.")
        self.seconds = 0.0
        self.calls = 0

    def to(self, device: torch.device) -> "TeacherRunner":
        self.teacher.to(device)
        return self

    def device(self) -> torch.device:
        return next(self.teacher.parameters()).device

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.teacher.training:
            self.teacher.eval()
        device = self.device()
        if device != pixel_values.device:
            self.teacher.to(pixel_values.device)
            device = pixel_values.device
        _synchronize(device)
        started = time.perf_counter()
        x = pixel_values.to(self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            outputs = self.io.call(x, model=self._forward)
        except Exception as error:  # only compilation errors are retried; an eager failure is raised as it is
            if not self._compiled:
                raise
            logger.warning(
                "torch.compile of the teacher failed (%s: %.200s); running it eagerly.", type(error).__name__, error
            )
            self._forward, self._compiled = self.teacher, False
            outputs = self.io.call(x)
        logits = output_logits(outputs).float()
        _synchronize(device)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return logits


class StepTimeCallback(TrainerCallback):
    """Logs `teacher_share`: the fraction of the training steps' time (forward, backward, optimizer) in the teacher.

    Steps are timed from `on_step_begin` to `on_step_end` (data loading excluded); on CUDA both ends synchronise.
    """

    def __init__(self, runner: TeacherRunner) -> None:
        self.runner = runner
        self.step_seconds = 0.0
        self._teacher_at_log = 0.0
        self._steps_at_log = 0.0
        self._started: float | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _synchronize(self.runner.device())
        self._started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._started is not None:
            _synchronize(self.runner.device())
            self.step_seconds += time.perf_counter() - self._started
            self._started = None

    def teacher_share(self) -> float | None:
        """Teacher seconds / step seconds since training began (None before the first step)."""
        return self.runner.seconds / self.step_seconds if self.step_seconds > 0 else None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        steps = self.step_seconds - self._steps_at_log
        if logs is not None and "loss" in logs and steps > 0:
            logs["teacher_share"] = round((self.runner.seconds - self._teacher_at_log) / steps, 4)
            self._teacher_at_log, self._steps_at_log = self.runner.seconds, self.step_seconds
