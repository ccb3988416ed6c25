"""DeiT's training augmentation for image / label rows, reproducible per example so that resumed runs match.

`DeiTTrainTransform` runs timm's training pipeline (random resized crop, flip, RandAugment, normalisation, random
erasing) on the `image` column of a `datasets.Dataset` (set it with `dataset.with_transform`). Each example's random
draws are seeded from (seed, epoch, example index), so the pixels of a step do not depend on the number of
dataloader workers or on where training was interrupted; `AugmentationEpochCallback` tells the transform the epoch.
`deit_mixup` builds timm's mixup / cutmix with DeiT's values, for `DistillationTrainer(mixup_fn=...)`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from .data import INDEX_COLUMN, dataset_transform

# DeiT's defaults (facebookresearch/deit main.py, get_args_parser): --aa, --reprob, --remode, --recount,
# --color-jitter (unused once RandAugment is on), --train-interpolation, --mixup, --cutmix, --mixup-prob,
# --mixup-switch-prob, --mixup-mode, --smoothing.
DEIT_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
DEIT_RE_PROB, DEIT_RE_MODE, DEIT_RE_COUNT = 0.25, "pixel", 1
DEIT_COLOR_JITTER = 0.3
DEIT_INTERPOLATION = "bicubic"
DEIT_MIXUP, DEIT_CUTMIX, DEIT_MIXUP_PROB, DEIT_SWITCH_PROB, DEIT_MIXUP_MODE = 0.8, 1.0, 1.0, 0.5, "batch"
DEIT_SMOOTHING = 0.1


def _posterize(image: Any, bits_to_keep: int, **_: Any) -> Any:
    """RandAugment's posterize; 0 bits gives the black image older Pillow made (Pillow 13 refuses 0 bits)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


class DeiTTrainTransform:
    """Batched `with_transform` callable: `image` / `label` (/ index) rows -> `pixel_values`, `labels` (/ index).

    Images of at most 32 px get a padded random crop instead of the random resized crop, as DeiT's
    `build_transform` does for CIFAR-sized inputs. Without an index column the draws come from the global
    random state (augmented all the same, but a resumed run then sees other pixels than an uninterrupted one).
    """

    is_random = True  # DistillationTrainer refuses to cache teacher logits of randomly augmented pixels

    def __init__(
        self,
        image_size: int,
        num_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        auto_augment: str | None = DEIT_AUTO_AUGMENT,
        re_prob: float = DEIT_RE_PROB,
        re_mode: str = DEIT_RE_MODE,
        re_count: int = DEIT_RE_COUNT,
        color_jitter: float = DEIT_COLOR_JITTER,
        interpolation: str = DEIT_INTERPOLATION,
        seed: int = 0,
        image_column: str = "image",
        label_column: str = "label",
        index_column: str = INDEX_COLUMN,
    ) -> None:
        from timm.data import create_transform
        from torchvision import transforms

        if num_channels not in (1, 3):
            raise ValueError(f"num_channels={num_channels}; expected 1 (grey) or 3 (RGB).")
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size={image_size!r} must be a positive number of pixels (square images).")
        self.pipeline = create_transform(
            input_size=image_size,
            is_training=True,
            auto_augment=auto_augment,
            color_jitter=color_jitter,
            interpolation=interpolation,
            re_prob=re_prob,
            re_mode=re_mode,
            re_count=re_count,
            mean=tuple(mean),
            std=tuple(std),
        )
        if image_size <= 32:
            self.pipeline.transforms[0] = transforms.RandomCrop(image_size, padding=4)
        for transform in self.pipeline.transforms:
            for op in getattr(transform, "ops", []):  # RandAugment's operations
                if getattr(op, "name", "").startswith("Posterize"):
                    op.aug_fn = _posterize
        self.mode = "L" if num_channels == 1 else "RGB"
        self.seed = seed
        self.epoch = 0
        self.image_column, self.label_column, self.index_column = image_column, label_column, index_column

    def _one(self, image: Any, index: int | None) -> torch.Tensor:
        image = image.convert(self.mode) if hasattr(image, "convert") else image
        if index is None:
            return self.pipeline(image)
        seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:  # the draws of this example only; the caller's random state is left as it was
            random.seed(seed)
            np.random.seed(seed)
            torch.default_generator.manual_seed(seed)  # CPU only: transforms never draw on an accelerator
            return self.pipeline(image)
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self.image_column not in batch:
            raise KeyError(f"The dataset has no {self.image_column!r} column (columns: {list(batch)}).")
        indices = batch.get(self.index_column) or [None] * len(batch[self.image_column])
        out: dict[str, list] = {
            "pixel_values": [
                self._one(im, None if i is None else int(i)) for im, i in zip(batch[self.image_column], indices)
            ]
        }
        if self.label_column in batch:
            out["labels"] = [int(label) for label in batch[self.label_column]]
        if self.index_column in batch:
            out[self.index_column] = [int(i) for i in batch[self.index_column]]
        return out


class AugmentationEpochCallback(TrainerCallback):
    """Tell the training set's `DeiTTrainTransform` which epoch begins (its per-example seeds depend on it)."""

    def on_epoch_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None, **kwargs: Any) -> None:
        transform = dataset_transform(getattr(train_dataloader, "dataset", None))
        if isinstance(transform, DeiTTrainTransform):
            transform.epoch = math.floor(state.epoch + 1e-6)


def deit_mixup(
    num_classes: int,
    mixup_alpha: float = DEIT_MIXUP,
    cutmix_alpha: float = DEIT_CUTMIX,
    prob: float = DEIT_MIXUP_PROB,
    switch_prob: float = DEIT_SWITCH_PROB,
    label_smoothing: float = DEIT_SMOOTHING,
) -> Any:
    """timm's `Mixup` (batch mode) with DeiT's values; None when both alphas are 0 (no mixing)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=prob,
        switch_prob=switch_prob,
        mode=DEIT_MIXUP_MODE,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
