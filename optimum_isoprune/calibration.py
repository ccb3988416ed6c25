"""Turn whatever calibration data the user has into (pixel_values, labels) batches."""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import numpy as np
import torch

from .errors import CalibrationDataError
from .guards import check_labels, require_finite

Batch = tuple[torch.Tensor, torch.Tensor | None]


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return torch.stack(list(value))
    return torch.as_tensor(np.asarray(value))


def _from_mapping(row: dict) -> Batch:
    if "pixel_values" not in row:
        raise CalibrationDataError(
            f"Calibration data has no 'pixel_values' (found keys {sorted(row)}); map your images to "
            "'pixel_values' with the model's image processor first, e.g. dataset.with_transform(...)."
        )
    labels = row.get("labels", row.get("label"))
    return _as_tensor(row["pixel_values"]).float(), None if labels is None else _as_tensor(labels)


def _rows_to_batches(rows: Iterator[dict], batch_size: int) -> Iterator[Batch]:
    while chunk := list(itertools.islice(rows, batch_size)):
        pixels, labels = zip(*(_from_mapping(r) for r in chunk))
        yield torch.stack(pixels), None if labels[0] is None else torch.stack(labels).view(-1)


def calibration_batches(data: Any, batch_size: int, max_batches: int, seed: int) -> Iterator[Batch]:
    """Batches from a `datasets.Dataset` / `IterableDataset`, a torch `DataLoader`, or a tensor (N, C, H, W)."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 4:
            raise CalibrationDataError(f"A calibration tensor must be (N, C, H, W), got shape {tuple(data.shape)}.")
        if data.shape[0] == 0:
            raise CalibrationDataError(f"The calibration tensor holds no images (shape {tuple(data.shape)}).")
        batches = ((chunk.float(), None) for chunk in data.split(batch_size))
    elif isinstance(data, torch.utils.data.DataLoader):
        batches = (_from_loader_item(item) for item in data)
    elif hasattr(data, "features") and hasattr(data, "shuffle"):  # datasets.Dataset / IterableDataset
        batches = _rows_to_batches(iter(data.shuffle(seed=seed)), batch_size)
    else:
        raise CalibrationDataError(
            f"Unsupported calibration data of type {type(data).__name__}: pass a datasets.Dataset or "
            "IterableDataset with 'pixel_values' (and 'labels'), a torch DataLoader, or a tensor (N, C, H, W)."
        )
    return _checked(itertools.islice(batches, max_batches))


def _checked(batches: Iterator[Batch]) -> Iterator[Batch]:
    """Refuse empty batches, NaN/inf pixels and unusable labels (naming the batch); labels come out as int64."""
    for number, (pixels, labels) in enumerate(batches):
        where = f"in calibration batch {number}"
        if pixels.numel() == 0:
            raise CalibrationDataError(f"Calibration pixel_values {where} are empty (shape {tuple(pixels.shape)}).")
        require_finite(
            pixels,
            "Calibration pixel_values",
            where,
            "Importance scores from them would be meaningless; clean or drop those images.",
        )
        if labels is not None:
            check_labels(labels, None, where, CalibrationDataError)
            labels = labels.long()
        yield pixels, labels


def _from_loader_item(item: Any) -> Batch:
    if isinstance(item, dict):
        return _from_mapping(item)
    if isinstance(item, (list, tuple)):
        return item[0].float(), _as_tensor(item[1]) if len(item) > 1 else None
    return item.float(), None


def check_batch(batch: Batch, num_channels: int, image_size: int) -> None:
    """Fail early, naming the expected shape, when calibration images don't fit the model."""
    pixels = batch[0]
    expected = (num_channels, image_size, image_size)
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
        raise CalibrationDataError(
            f"Calibration pixel_values have shape {tuple(pixels.shape)}, expected (batch, {expected[0]}, "
            f"{expected[1]}, {expected[2]}); resize the images or set IsomorphicPruningConfig(image_size=...)."
        )
