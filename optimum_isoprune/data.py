"""Image-classification data: Fashion-MNIST from Debian's IDX files, Hub / imagefolder datasets, lazy transforms."""

from __future__ import annotations

import functools
import gzip
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, Features, Image, IterableDataset, Value, load_dataset

from .adapters import adapter_for
from .adapters.io import processor_normalization
from .errors import DataError

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INDEX_COLUMN = "idx"
LABEL_COLUMNS = ("label", "labels", "fine_label")  # as Hub image datasets name them (CIFAR-100: fine_label)
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_MAGIC = {3: 2051, 1: 2049}  # IDX magic numbers of uint8 tensors with 3 dims (images) and 1 dim (labels)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one gzip-compressed uint8 IDX file (the MNIST format) into a numpy array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(f"{path} is not a uint8 IDX file with {ndim} dimension(s) (magic number {magic}).")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_fashion_mnist(
    split: str = "train", data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> Dataset:
    """Load Fashion-MNIST from local gzip IDX files (no network) as a `Dataset` with `image` and `label` features.

    `data_dir` defaults to Debian's `/usr/share/datasets/fashion-mnist`; `limit` keeps the first examples only.
    """
    if split not in _SPLIT_PREFIX:
        raise DataError(
            f"split={split!r} is not a Fashion-MNIST split; use 'train' (60,000 images) or 'test' (10,000)."
        )
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit} must be a positive number of examples, or None for the whole split.")
    directory = Path(data_dir if data_dir is not None else FASHION_MNIST_DIR)
    prefix = _SPLIT_PREFIX[split]
    images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
    missing = [str(p) for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass data_dir= a folder holding "
            f"{prefix}-images-idx3-ubyte.gz and {prefix}-labels-idx1-ubyte.gz."
        )
    images = _read_idx(images_path, 3)
    labels = _read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels.")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    features = Features({"image": Image(), "label": ClassLabel(names=FASHION_MNIST_LABELS)})
    logger.info("Loaded %d Fashion-MNIST %s examples from %s", len(labels), split, directory)
    return Dataset.from_dict({"image": list(images), "label": labels.astype(np.int64)}, features=features)


def load_image_dataset(
    name_or_dir: str | os.PathLike,
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    **load_kwargs: Any,
) -> Dataset:
    """Load an image-classification split with `datasets.load_dataset`: a Hub id, or a local `imagefolder` directory.

    The image and label columns are renamed to `image` and `label` so the rest of the pipeline sees one layout.
    """
    if os.path.isdir(name_or_dir) and not any(Path(name_or_dir).glob("*.py")):
        from datasets.utils import logging as datasets_logging

        # Local files are not downloaded: the "Downloading data" / "Generating split" bars would only be noise.
        bars_were_on = datasets_logging.is_progress_bar_enabled()
        datasets_logging.disable_progress_bar()
        try:
            dataset = load_dataset("imagefolder", data_dir=str(name_or_dir), split=split, **load_kwargs)
        finally:
            if bars_were_on:
                datasets_logging.enable_progress_bar()
    else:
        dataset = load_dataset(str(name_or_dir), split=split, **load_kwargs)
    for column, wanted in ((image_column, "image"), (label_column, "label")):
        if column not in dataset.column_names:
            raise DataError(
                f"{name_or_dir!r} split {split!r} has no column {column!r} (columns: {dataset.column_names}); "
                f"pass {'image' if wanted == 'image' else 'label'}_column= the right name."
            )
        if column != wanted:
            dataset = dataset.rename_column(column, wanted)
    return dataset


def add_index_column(dataset: Dataset, name: str = INDEX_COLUMN) -> Dataset:
    """Add a column holding each example's position, the key of `DistillationTrainer`'s teacher-logit cache.

    Call it before `prepare_dataset` (a transform set on a dataset is kept by `add_column`).
    """
    if name in dataset.column_names:
        raise DataError(f"The dataset already has a column named {name!r}; pass another name=.")
    return dataset.add_column(name, list(range(len(dataset))))


class ImageClassificationTransform:
    """Turn a batch of `image` / `label` rows into `pixel_values` (C, H, W) float tensors and integer `labels`.

    Images are converted to `num_channels` (grey images are repeated to 3 channels when needed), resized to
    `image_size` when they differ, scaled to [0, 1], normalised, and flipped left-right at random when
    `random_flip` is set (training). An index column, if present, passes through for the teacher-logit cache.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int] = 28,
        num_channels: int = 1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        random_flip: bool = False,
        image_column: str = "image",
        label_column: str = "label",
        index_column: str = INDEX_COLUMN,
    ) -> None:
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels={num_channels}; expected 1 (grey) or 3 (RGB).")
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.num_channels = num_channels
        default_mean, default_std = (
            (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if num_channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
        )
        mean = tuple(default_mean if mean is None else mean)
        std = tuple(default_std if std is None else std)
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, num_channels):
                raise ValueError(f"{name} has {len(values)} values; expected 1 or num_channels={num_channels}.")
        if any(s <= 0 for s in std):
            raise ValueError(f"std={std} must be positive.")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.random_flip = random_flip
        self.image_column = image_column
        self.label_column = label_column
        self.index_column = index_column

    @property
    def is_random(self) -> bool:
        """Whether the same example can give different pixels twice (then cached teacher logits would be wrong)."""
        return self.random_flip

    def image_to_tensor(self, image: Any) -> torch.Tensor:
        """Convert one PIL image or array to a normalised (C, H, W) float tensor."""
        if hasattr(image, "convert"):
            image = image.convert("L" if self.num_channels == 1 else "RGB")
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array)
        tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
        if tensor.shape[0] == 1 and self.num_channels == 3:
            tensor = tensor.expand(3, -1, -1)
        elif tensor.shape[0] != self.num_channels:
            tensor = tensor.mean(0, keepdim=True) if self.num_channels == 1 else tensor[:3]
        if tuple(tensor.shape[1:]) != self.image_size:
            tensor = F.interpolate(
                tensor.unsqueeze(0), size=self.image_size, mode="bilinear", antialias=True, align_corners=False
            )[0]
        tensor = (tensor - self.mean) / self.std
        if self.random_flip and torch.rand(()) < 0.5:
            tensor = tensor.flip(-1)
        return tensor.contiguous()

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self.image_column not in batch:
            raise KeyError(
                f"The dataset has no {self.image_column!r} column (columns: {list(batch)}); set image_column=."
            )
        out: dict[str, list] = {"pixel_values": [self.image_to_tensor(image) for image in batch[self.image_column]]}
        if self.label_column in batch:
            labels = batch[self.label_column]
            if any(isinstance(label, str) for label in labels):
                raise DataError(_text_labels(self.label_column))
            out["labels"] = [int(label) for label in labels]
        if self.index_column in batch:
            out[self.index_column] = [int(i) for i in batch[self.index_column]]
        return out


def prepare_dataset(
    dataset: Dataset | IterableDataset,
    train: bool = False,
    model: torch.nn.Module | None = None,
    image_processor: Any = None,
    **transform_kwargs: Any,
) -> Dataset | IterableDataset:
    """Attach an `ImageClassificationTransform` lazily (`with_transform`; an `IterableDataset` is mapped as it
    streams); `train=True` turns on random flips.

    With `model`, image size, channel count, mean and std default to what the model expects: its image
    processor (`image_processor=`, or the one saved beside the model), else timm's pretrained config. The
    dataset's labels are checked against the model's (`check_labels`) before anything runs.
    """
    if model is not None:
        size, channels = adapter_for(model).input_spec()
        if size is not None:
            transform_kwargs.setdefault("image_size", size)
        if channels is not None:
            transform_kwargs.setdefault("num_channels", channels)
        check_labels(dataset, model, label_column=transform_kwargs.get("label_column", "label"))
    if "mean" not in transform_kwargs and "std" not in transform_kwargs:
        known = _normalization(model, image_processor)
        if known is not None:
            transform_kwargs["mean"], transform_kwargs["std"] = known
        else:
            channels = transform_kwargs.get("num_channels", 1)
            default = "Fashion-MNIST" if channels == 1 else "ImageNet"
            _warn_once(
                f"No image processor or timm pretrained config gives the model's mean/std: normalising with {default}'s "
                "defaults. If the model was trained otherwise, pass prepare_dataset(..., image_processor=) or mean=, std=."
            )
    transform_kwargs.setdefault("random_flip", train)
    transform = ImageClassificationTransform(**transform_kwargs)
    if isinstance(dataset, IterableDataset):  # a stream has no lazy transform: rows are mapped as they are read
        return dataset.map(transform, batched=True, remove_columns=dataset.column_names)
    return dataset.with_transform(transform)


def _normalization(model: torch.nn.Module | None, image_processor: Any) -> tuple[list[float], list[float]] | None:
    """(mean, std) from `image_processor`, else from what the model knows (`ModelIO.normalization`)."""
    if model is None:
        return processor_normalization(image_processor) if image_processor is not None else None
    return adapter_for(model).normalization(image_processor)


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


_SPLIT_NAMES = {"train", "training", "test", "testing", "validation", "valid", "val", "eval", "dev"}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


def check_labels(dataset: Any, model: torch.nn.Module, label_column: str = "label") -> None:
    """Fail before any work when the dataset's classes cannot be the model's; warn where only the names differ.

    Errors: more classes in the data than the model predicts; class names that are split names (an image folder
    without class subfolders); the model's own class names in another order. Warnings: fewer classes than the
    model, or names that differ (the labels are then taken by position: the i-th folder in alphabetical order is
    the model's class i).
    """
    features = getattr(dataset, "features", None)
    feature = features.get(label_column) if features is not None and hasattr(features, "get") else None
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        raise DataError(_text_labels(label_column))
    if not isinstance(feature, ClassLabel):
        return
    data_names = list(feature.names)
    num_labels = adapter_for(model).num_labels()
    if data_names and {n.lower() for n in data_names} <= _SPLIT_NAMES:
        raise DataError(
            f"The dataset's labels are {data_names}, the names of split folders: the image folder has no class "
            "subfolders. Lay it out as <dir>/<split>/<class name>/<image>, e.g. data/train/cat/1.png."
        )
    if num_labels is not None and len(data_names) > num_labels:
        raise DataError(
            f"The dataset has {len(data_names)} classes ({_short(data_names)}) but the model predicts {num_labels}; "
            "use the dataset the model was trained for, or a model with a head for these classes."
        )
    model_names = adapter_for(model).label_names()
    if num_labels is not None and len(data_names) < num_labels:
        logger.warning(
            "The dataset has %d classes (%s) but the model predicts %d: label i of the data is read as the model's "
            "class i%s.",
            len(data_names),
            _short(data_names),
            num_labels,
            f" ({_short(model_names)})" if model_names else "",
        )
        return
    if model_names is None or len(model_names) != len(data_names):
        return
    data_norm, model_norm = [_norm(n) for n in data_names], [_norm(n) for n in model_names]
    if data_norm == model_norm:
        return
    if sorted(data_norm) == sorted(model_norm):
        raise DataError(
            f"The dataset's classes {_short(data_names)} are the model's {_short(model_names)} in another order; "
            "label i must be the model's class i. Rename the folders so that their alphabetical order is the model's "
            "order (e.g. 0_cat, 1_dog), or relabel the dataset (dataset.align_labels_with_mapping(model.config.label2id, "
            f"{label_column!r}))."
        )
    logger.warning(
        "The dataset's class names %s differ from the model's %s; they are matched by position (data label i = "
        "model class i).",
        _short(data_names),
        _short(model_names),
    )


def _text_labels(column: str) -> str:
    return (
        f"The {column!r} column holds class names (text), not class indices: encode it first, e.g. "
        f"dataset.class_encode_column({column!r}) (classes in alphabetical order), then check that label i is the "
        "model's class i."
    )


def _short(names: Sequence[str] | None, limit: int = 12) -> str:
    names = list(names or [])
    text = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
    return f"[{text}]"


def ensure_prepared(dataset: Any, model: torch.nn.Module, train: bool = False) -> Any:
    """`dataset` itself when it already gives `pixel_values`, else `prepare_dataset(dataset, train, model=model)` on
    its one Image column (`image`, `img`, ...; decoded first if it was cast with `decode=False`) and its label column
    (`LABEL_COLUMNS`)."""
    columns = raw_image_columns(dataset)
    if columns is None:
        return dataset
    image_column, label_column = columns
    if not dataset.features[image_column].decode:
        dataset = dataset.cast_column(image_column, Image(decode=True))
    return prepare_dataset(dataset, train=train, model=model, image_column=image_column, label_column=label_column)


def raw_image_columns(dataset: Any) -> tuple[str, str] | None:
    """(image column, label column) of a `Dataset` / `IterableDataset` of images with no `pixel_values` and no
    transform yet, else None. The image column is its one `Image` feature (not arrays of another layout); several
    are refused, naming them."""
    features = getattr(dataset, "features", None)
    if not isinstance(dataset, (Dataset, IterableDataset)) or not features or dataset_transform(dataset) is not None:
        return None
    images = [name for name, feature in features.items() if isinstance(feature, Image)]
    if not images or "pixel_values" in features:
        return None
    if len(images) > 1:
        raise DataError(
            f"The dataset has {len(images)} image columns {images}; keep the one the model classifies, e.g. "
            f"dataset.remove_columns({images[1:]!r}), or map it to 'pixel_values' with prepare_dataset(dataset, "
            f"model=model, image_column={images[0]!r})."
        )
    return images[0], next((name for name in LABEL_COLUMNS if name in features), LABEL_COLUMNS[0])


def dataset_transform(dataset: Any) -> Any:
    """The transform set on a `datasets.Dataset` with `with_transform` / `set_transform`, or None."""
    fmt = getattr(dataset, "format", None) or {}
    return (fmt.get("format_kwargs") or {}).get("transform")


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack transformed examples into a batch: `pixel_values` (B, C, H, W), `labels` and index as int64 tensors."""
    if not examples:
        raise DataError("collate_fn got an empty list of examples.")
    batch = {"pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])}
    for key in examples[0]:
        if key != "pixel_values":
            batch[key] = torch.tensor([e[key] for e in examples])
    return batch
