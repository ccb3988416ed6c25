"""Turn whatever calibration data the user has into (pixel_values, labels) batches."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any, Iterator

import numpy as np
import torch

from .errors import CalibrationDataError
from .guards import check_labels, require_finite

Batch = tuple[torch.Tensor, torch.Tensor | None]

FORMS = (
    "a datasets.Dataset or IterableDataset with 'pixel_values' (and 'labels'), a torch DataLoader or Dataset, a "
    "tensor or array (N, C, H, W), a list of (C, H, W) tensors or of row dicts, or a dict / BatchFeature of batched "
    "'pixel_values' (an image processor's output)"
)


def _as_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return torch.stack(list(value))
    return torch.as_tensor(np.asarray(value))


def _from_mapping(row: Mapping) -> Batch:
    if "pixel_values" not in row:
        raise CalibrationDataError(
            f"Calibration data has no 'pixel_values' (found keys {sorted(row)}); map your images to "
            "'pixel_values' with the model's image processor first, e.g. dataset.with_transform(...)."
        )
    labels = row.get("labels", row.get("label"))
    return _as_tensor(row["pixel_values"]), None if labels is None else _as_tensor(labels)


def _rows_to_batches(rows: Iterator[Mapping], batch_size: int) -> Iterator[Batch]:
    while chunk := list(itertools.islice(rows, batch_size)):
        pixels, labels = zip(*(_from_mapping(r) for r in chunk))
        yield torch.stack(pixels), None if labels[0] is None else torch.stack(labels)


def _split(pixels: torch.Tensor, labels: torch.Tensor | None, batch_size: int) -> Iterator[Batch]:
    """A whole set of images (N, C, H, W), and its labels, in batches."""
    if pixels.dim() != 4:
        raise CalibrationDataError(f"Calibration images must be (N, C, H, W), got shape {tuple(pixels.shape)}.")
    if pixels.shape[0] == 0:
        raise CalibrationDataError(f"The calibration data holds no images (shape {tuple(pixels.shape)}).")
    if labels is not None and (labels.dim() == 0 or len(labels) != len(pixels)):
        raise CalibrationDataError(f"{len(pixels)} calibration images but labels of shape {tuple(labels.shape)}.")
    label_chunks = labels.split(batch_size) if labels is not None else itertools.repeat(None)
    return zip(pixels.split(batch_size), label_chunks)


def calibration_batches(data: Any, batch_size: int, max_batches: int, seed: int) -> Iterator[Batch]:
    """(pixel_values, labels) batches from any of `FORMS`; datasets are shuffled with `seed`."""
    if isinstance(data, (list, tuple)) and data and _all(data, torch.Tensor):
        shapes = sorted({tuple(image.shape) for image in data})
        if len(shapes) > 1:
            raise CalibrationDataError(f"The calibration images differ in shape ({shapes[:3]}); resize them to one.")
        data = torch.stack(list(data))
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, Mapping) and data and all(map(_is_hub_dataset, data.values())):  # a DatasetDict
        raise CalibrationDataError(
            f"The calibration data is a dict of splits {sorted(data)}: pass one, e.g. data['train']."
        )
    if isinstance(data, torch.utils.data.Dataset) and not _is_hub_dataset(data):  # e.g. TensorDataset, torchvision
        shuffle = not isinstance(data, torch.utils.data.IterableDataset)
        data = torch.utils.data.DataLoader(
            data, batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed)
        )
    if isinstance(data, torch.Tensor):
        batches = _split(data, None, batch_size)
    elif isinstance(data, Mapping):
        batches = _split(*_from_mapping(data), batch_size)
    elif isinstance(data, (list, tuple)) and data and _all(data, Mapping):
        batches = _rows_to_batches(iter(data), batch_size)
    elif isinstance(data, torch.utils.data.DataLoader):
        batches = (_from_loader_item(item) for item in _loaded(data))
    elif _is_hub_dataset(data):
        batches = _rows_to_batches(iter(data.shuffle(seed=seed)), batch_size)
    else:
        empty = " (it is empty)" if isinstance(data, (list, tuple)) and not data else ""
        raise CalibrationDataError(f"Unsupported calibration data of type {type(data).__name__}{empty}: pass {FORMS}.")
    return _checked(itertools.islice(batches, max_batches))


def _all(items: Iterable, kind: type) -> bool:
    return all(isinstance(item, kind) for item in items)


def _is_hub_dataset(data: Any) -> bool:
    """A `datasets.Dataset` / `IterableDataset` (without importing `datasets`)."""
    return hasattr(data, "features") and hasattr(data, "shuffle")


def _loaded(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """The loader's batches; a collate failure (e.g. PIL images, which it cannot stack) says what to pass instead."""
    items = iter(loader)
    while True:
        try:
            yield next(items)
        except StopIteration:
            return
        except TypeError as error:
            if "collate" not in str(error):
                raise
            raise CalibrationDataError(
                f"The calibration data could not be batched ({str(error).splitlines()[0]}). Give the images as "
                "tensors (e.g. through the model's image processor), or pass a datasets.Dataset with an Image "
                "column itself (it is prepared for the model)."
            ) from error


def _checked(batches: Iterator[Batch]) -> Iterator[Batch]:
    """Refuse empty batches, integer or NaN/inf pixels and unusable labels (naming the batch); pixels come out as
    float32, labels as int64."""
    for number, (pixels, labels) in enumerate(batches):
        where = f"in calibration batch {number}"
        if pixels.numel() == 0:
            raise CalibrationDataError(f"Calibration pixel_values {where} are empty (shape {tuple(pixels.shape)}).")
        if not pixels.is_floating_point():  # raw 0..255 values would rank channels on inputs the model never sees
            raise CalibrationDataError(
                f"Calibration pixel_values {where} are {pixels.dtype}, not normalised floats: run the images through "
                "the model's image processor first, or pass a datasets.Dataset with an Image column (it is prepared "
                "for the model: resized, scaled and normalised)."
            )
        require_finite(
            pixels,
            "Calibration pixel_values",
            where,
            "Importance scores from them would be meaningless; clean or drop those images.",
        )
        if labels is not None:
            labels = _class_indices(labels, len(pixels), where)
            check_labels(labels, None, where, CalibrationDataError)
            labels = labels.long()
        yield pixels.float(), labels


def _class_indices(labels: torch.Tensor, count: int, where: str) -> torch.Tensor:
    """One label per image: (N,) as given, (N, 1) flattened, one-hot (N, K) rows turned into their class index."""
    if labels.numel() == count:
        return labels.reshape(-1)
    if labels.dim() == 2 and len(labels) == count:
        hot = labels == 1
        if bool(((labels == 0) | hot).all()) and bool((hot.sum(1) == 1).all()):
            return hot.int().argmax(1)
    raise CalibrationDataError(
        f"Labels {where} have shape {tuple(labels.shape)} for {count} images: give one class index per image, "
        "or no labels (the model's own predictions are then used); soft or multi-label targets are not read."
    )


def _from_loader_item(item: Any) -> Batch:
    if isinstance(item, Mapping):
        return _from_mapping(item)
    if isinstance(item, (list, tuple)):
        return _as_tensor(item[0]), _as_tensor(item[1]) if len(item) > 1 else None
    return _as_tensor(item), None


def check_batch(batch: Batch, num_channels: int, image_size: int) -> None:
    """Fail early, naming the expected shape, when calibration images don't fit the model."""
    pixels = batch[0]
    expected = (num_channels, image_size, image_size)
    if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
        raise CalibrationDataError(
            f"Calibration pixel_values have shape {tuple(pixels.shape)}, expected (batch, {expected[0]}, "
            f"{expected[1]}, {expected[2]}); resize the images or set IsomorphicPruningConfig(image_size=...)."
        )
