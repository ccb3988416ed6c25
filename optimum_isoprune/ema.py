"""An exponential moving average (EMA) of the student's weights, as a `transformers` Trainer callback.

DeiT keeps an EMA of the weights during training (timm `ModelEma`, decay 0.99996) and reports it beside the model.
`EMACallback` updates the average after every optimizer step, writes it as `ema.safetensors` into each checkpoint
and reads it back when training resumes, so a resumed run ends with the same average as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from .adapters import adapter_for

logger = logging.getLogger(__name__)

EMA_WEIGHTS_NAME = "ema.safetensors"


class EMACallback(TrainerCallback):
    """Keep `ema_model`, a frozen copy of the model whose weights follow `ema = decay * ema + (1 - decay) * weights`.

    Floating-point parameters and buffers are averaged; integer buffers (BatchNorm's counter) are copied.
    `warmup=True` uses `min(decay, (1 + step) / (10 + step))` so that short runs are not dominated by the initial
    weights. `device` keeps the average elsewhere (e.g. "cpu" to spare accelerator memory). On resume the average is
    read from `<checkpoint>/ema.safetensors`, the checkpoint being `resume_from` or `output_dir/checkpoint-<step>`.
    """

    def __init__(
        self,
        decay: float = 0.99996,
        warmup: bool = False,
        device: str | torch.device | None = None,
        resume_from: str | os.PathLike | None = None,
    ) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay!r} must be a number in [0, 1) (DeiT uses 0.99996).")
        self.decay = float(decay)
        self.warmup = warmup
        self.device = torch.device(device) if device is not None else None
        self.resume_from = resume_from
        self.ema_model: nn.Module | None = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._copied: list[tuple[torch.Tensor, torch.Tensor]] = []

    def decay_at(self, step: int) -> float:
        """The decay used for the update after optimizer step `step` (1-based)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    def _track(self, model: nn.Module) -> None:
        ema = adapter_for(model).copy_model(model).eval().requires_grad_(False)
        if self.device is not None:
            ema.to(self.device)
        self.ema_model = ema
        live, averaged = model.state_dict(), ema.state_dict()
        self._pairs = [(averaged[k], live[k]) for k in live if live[k].is_floating_point()]
        self._copied = [(averaged[k], live[k]) for k in live if not live[k].is_floating_point()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the model's current weights."""
        weight = 1.0 - self.decay_at(step)
        for ema_value, value in self._pairs:
            ema_value.lerp_(value.to(ema_value.device, ema_value.dtype), weight)
        for ema_value, value in self._copied:
            ema_value.copy_(value)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the average to `directory/ema.safetensors`."""
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.ema_model.state_dict().items()}
        save_file(state, os.path.join(directory, EMA_WEIGHTS_NAME), metadata={"format": "pt"})

    def load(self, directory: str | os.PathLike) -> None:
        """Read the average back from `directory/ema.safetensors` (every weight must match)."""
        path = os.path.join(directory, EMA_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Resuming at a step > 0 but {path} does not exist, so the weight average cannot continue. Resume from "
                "a checkpoint written with EMACallback, or pass EMACallback(resume_from=<that checkpoint>)."
            )
        self.ema_model.load_state_dict(
            load_file(path, device=str(next(self.ema_model.parameters()).device)), strict=True
        )
        logger.info("Loaded the weight average from %s.", path)

    # ---- Trainer events -------------------------------------------------------------------------------------------

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if model is None:
            raise ValueError("EMACallback needs the model; add it to a transformers Trainer (trainer.add_callback).")
        self._track(model)  # after the Trainer loaded a resumed checkpoint's weights
        if state.global_step > 0:
            self.load(self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.update(state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.should_save and self.ema_model is not None:
            directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(directory, exist_ok=True)
            self.save(directory)
