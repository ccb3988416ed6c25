"""How the package talks to any image classifier: calling it, its input, normalisation and labels.

`ModelIO` reads what a transformers model keeps in its config and what a timm model keeps in its modules
and `pretrained_cfg`. Every architecture adapter is a `ModelIO`; `adapters.adapter_for(model)` returns the
model's adapter, or a plain `ModelIO` for a classifier the pruner does not know (a student, a teacher).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
from typing import Any

import torch
from torch import nn
from transformers.utils import IMAGE_PROCESSOR_NAME as PREPROCESSOR_NAME


def output_logits(outputs: Any) -> torch.Tensor:
    """Logits from a transformers output (`.logits`), a timm tensor, or a timm distilled (cls, dist) tuple (averaged)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if logits is not None:
        return logits
    if isinstance(outputs, (tuple, list)) and len(outputs) == 2 and all(isinstance(o, torch.Tensor) for o in outputs):
        return (outputs[0] + outputs[1]) / 2
    raise TypeError(
        f"Cannot find logits in a model output of type {type(outputs).__name__}; expected `.logits` or a tensor."
    )


class ModelIO:
    """One classifier as the package sees it from outside: how to call it and what input and labels it expects."""

    def __init__(self, model: nn.Module):
        self.model = model

    def copy_model(self, model: nn.Module) -> nn.Module:
        """A deep copy of `model` (the copy that is pruned, an EMA's average, a copy timed elsewhere); `model` is left
        as it is. Adapters override it where a model holds what `copy.deepcopy` refuses (LeViT's bias caches)."""
        return copy.deepcopy(model)

    def call(self, pixel_values: torch.Tensor, model: nn.Module | None = None) -> Any:
        """Run the model (transformers: `pixel_values=` keyword; timm: positional tensor); return its raw output.

        `model` is what to call instead of `self.model` with the same convention, e.g. its DDP wrapper.
        """
        target = self.model if model is None else model
        if self.accepts_keyword("pixel_values"):
            return target(pixel_values=pixel_values)
        return target(pixel_values)

    def predict(self, pixel_values: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        """The logits of `call` (a distilled timm model's two heads averaged)."""
        return output_logits(self.call(pixel_values, model))

    def accepts_keyword(self, name: str) -> bool:
        parameters = inspect.signature(self.model.forward).parameters
        return name in parameters or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())

    def input_spec(self) -> tuple[int | tuple[int, ...] | None, int | None]:
        """(image_size, num_channels) the model expects, None where unknown (a CNN takes any size)."""
        model = self.model
        config = vision_config(getattr(model, "config", None))
        size = getattr(config, "image_size", None)
        channels = getattr(config, "num_channels", None)
        patch_embed = getattr(model, "patch_embed", None)
        if size is None and patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
            size = patch_embed.img_size
        if channels is None:
            first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
            channels = first_conv.in_channels if first_conv is not None else None
        # timm's pretrained_cfg describes the pretrained weights; the built modules above win when they say otherwise,
        # and its input size binds only models with a fixed input size (CNNs take any).
        pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
        if "input_size" in pretrained_cfg:
            if size is None and pretrained_cfg.get("fixed_input_size", False):
                size = tuple(pretrained_cfg["input_size"][1:])
            if channels is None:
                channels = pretrained_cfg["input_size"][0]
        if isinstance(size, (tuple, list)):
            size = int(size[0]) if len(set(size)) == 1 else tuple(int(s) for s in size)
        return size, channels

    def normalization(self, image_processor: Any = None) -> tuple[list[float], list[float]] | None:
        """(mean, std) the model was trained with: from `image_processor`, timm's `pretrained_cfg`, or the
        processor saved beside the model; None when none of them is known."""
        if image_processor is not None:
            found = processor_normalization(image_processor)
            if found is not None:
                return found
        model = self.model
        for cfg in (
            getattr(model, "pretrained_cfg", None),
            getattr(getattr(model, "config", None), "pretrained_cfg", None),
        ):
            if isinstance(cfg, dict) and cfg.get("mean") is not None and cfg.get("std") is not None:
                return processor_normalization(cfg)
        processor = self.saved_processor()
        return processor_normalization(processor) if processor is not None else None

    def saved_processor(self) -> dict[str, Any] | None:
        """The `preprocessor_config.json` saved beside a transformers model (local folder or Hub cache), never downloaded."""
        model = self.model
        name = str(
            getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        )
        if not name:
            return None
        path: str | None = os.path.join(name, PREPROCESSOR_NAME)
        if not os.path.isfile(path):
            path = None
            if not os.path.exists(name):
                try:
                    from huggingface_hub import try_to_load_from_cache

                    cached = try_to_load_from_cache(name, PREPROCESSOR_NAME)
                    path = cached if isinstance(cached, str) else None
                except Exception:  # not a valid repo id: no cached processor
                    path = None
        if path is None:
            return None
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    def label_names(self) -> list[str] | None:
        """The model's class names in id order, or None when it has no real names (transformers' LABEL_0, timm)."""
        id2label = getattr(getattr(self.model, "config", None), "id2label", None)
        if not id2label:
            return None
        names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(len(id2label))]
        if all(re.fullmatch(r"LABEL_\d+", n) or not n for n in names):
            return None
        return names

    def num_labels(self) -> int | None:
        """Number of classes of a transformers (`config.num_labels`) or timm (`num_classes`) classifier."""
        config = getattr(self.model, "config", None)
        if config is not None and getattr(config, "num_labels", None) is not None:
            return int(config.num_labels)
        num_classes = getattr(self.model, "num_classes", None)
        return int(num_classes) if isinstance(num_classes, int) else None


def vision_config(config: Any) -> Any:
    """The config that holds the image fields: a composite one's `vision_config` (CLIP, SigLIP), else `config`."""
    return getattr(config, "vision_config", None) or config


def processor_normalization(source: Any) -> tuple[list[float], list[float]] | None:
    """(mean, std) of an image processor (object or dict) or of timm's `pretrained_cfg`; None when it has none."""
    get = source.get if isinstance(source, dict) else lambda key, default=None: getattr(source, key, default)
    if get("do_normalize", True) is False:
        channels = len(get("image_mean", None) or (0, 0, 0))
        return [0.0] * channels, [1.0] * channels
    mean, std = get("image_mean", None), get("image_std", None)
    if mean is None or std is None:
        mean, std = get("mean", None), get("std", None)  # timm's pretrained_cfg
    if mean is None or std is None:
        return None
    return [float(v) for v in mean], [float(v) for v in std]
