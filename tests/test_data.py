import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from optimum_isoprune.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_LABELS,
    ImageClassificationTransform,
    add_index_column,
    collate_fn,
    dataset_transform,
    ensure_prepared,
    load_fashion_mnist,
    load_image_dataset,
    prepare_dataset,
)


def _write_idx(path, array, magic):
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 28, 28))
    labels = np.array([0, 1, 2, 3, 9, 5])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, 2051)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels, 2049)
    return tmp_path, images, labels


def test_reads_idx_files_into_image_and_classlabel_features(tiny_idx_dir):
    directory, images, labels = tiny_idx_dir
    ds = load_fashion_mnist("test", data_dir=directory)
    assert len(ds) == 6
    assert ds.features["label"].names == FASHION_MNIST_LABELS
    assert ds["label"] == labels.tolist()
    np.testing.assert_array_equal(np.asarray(ds[4]["image"]), images[4])
    assert len(load_fashion_mnist("test", data_dir=directory, limit=2)) == 2


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", data_dir=tmp_path)


def test_corrupt_file_is_named(tiny_idx_dir):
    directory, _, labels = tiny_idx_dir
    _write_idx(directory / "t10k-labels-idx1-ubyte.gz", labels, 1234)
    with pytest.raises(ValueError, match="magic"):
        load_fashion_mnist("test", data_dir=directory)


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-labels-idx1-ubyte.gz")),
    reason="Debian dataset-fashion-mnist not installed",
)
def test_debian_fashion_mnist_first_examples():
    ds = load_fashion_mnist("train", limit=3)
    assert ds["label"] == [9, 0, 0]  # the published first labels: ankle boot, T-shirt, T-shirt
    assert ds[0]["image"].size == (28, 28)


def test_transform_is_lazy_and_normalises(tiny_idx_dir):
    directory, images, labels = tiny_idx_dir
    raw = load_fashion_mnist("test", data_dir=directory)
    ds = prepare_dataset(raw, mean=(0.5,), std=(0.25,))
    assert ds.column_names == ["image", "label"]  # nothing materialised
    example = ds[2]
    expected = (torch.tensor(images[2], dtype=torch.float32) / 255 - 0.5) / 0.25
    torch.testing.assert_close(example["pixel_values"], expected.unsqueeze(0))
    assert example["labels"] == labels[2]


def test_resize_and_channel_repeat_for_other_models(tiny_idx_dir):
    directory, *_ = tiny_idx_dir
    ds = prepare_dataset(load_fashion_mnist("test", data_dir=directory), image_size=32, num_channels=3)
    pixel_values = ds[0]["pixel_values"]
    assert pixel_values.shape == (3, 32, 32)
    # grey repeated: the channels differ only by the per-channel ImageNet normalisation
    std, mean = torch.tensor([0.229, 0.224, 0.225]), torch.tensor([0.485, 0.456, 0.406])
    raw = pixel_values * std.view(3, 1, 1) + mean.view(3, 1, 1)
    torch.testing.assert_close(raw[0], raw[2])


def test_random_flip_only_in_training(tiny_idx_dir):
    directory, images, _ = tiny_idx_dir
    raw = load_fashion_mnist("test", data_dir=directory)
    transform = ImageClassificationTransform(random_flip=True)
    torch.manual_seed(0)
    outs = [transform({"image": [raw[0]["image"]]})["pixel_values"][0] for _ in range(20)]
    plain = ImageClassificationTransform()({"image": [raw[0]["image"]]})["pixel_values"][0]
    flips = sum(torch.equal(o, plain.flip(-1)) for o in outs)
    assert 0 < flips < 20 and all(torch.equal(o, plain) or torch.equal(o, plain.flip(-1)) for o in outs)
    assert dataset_transform(prepare_dataset(raw, train=True)).is_random
    assert not dataset_transform(prepare_dataset(raw)).is_random


def test_index_column_and_collate(tiny_idx_dir):
    directory, _, labels = tiny_idx_dir
    ds = prepare_dataset(add_index_column(load_fashion_mnist("test", data_dir=directory)))
    batch = collate_fn([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 1, 28, 28) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].tolist() == labels[:4].tolist()
    assert batch["idx"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="already has a column"):
        add_index_column(add_index_column(load_fashion_mnist("test", data_dir=directory)))


def test_bad_transform_arguments():
    with pytest.raises(ValueError, match="num_channels"):
        ImageClassificationTransform(num_channels=2)
    with pytest.raises(ValueError, match="mean"):
        ImageClassificationTransform(num_channels=3, mean=(0.1, 0.2))


def test_imagefolder_directory_loads_offline(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(2):
            PILImage.fromarray(np.full((40, 30, 3), 60 * i, dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    ds = load_image_dataset(tmp_path, split="train")
    assert len(ds) == 4 and ds.features["label"].names == ["cat", "dog"]
    prepared = prepare_dataset(ds, image_size=28, num_channels=1)
    assert prepared[0]["pixel_values"].shape == (1, 28, 28)
    with pytest.raises(ValueError, match="label_column"):
        load_image_dataset(tmp_path, split="train", label_column="fine_label")


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("image_column, label_column", [("image", "labels"), ("img", "label"), ("img", "fine_label")])
def test_raw_images_under_hub_column_names_are_prepared(image_column, label_column, streaming):
    # CIFAR-10 names its columns img / label, CIFAR-100 img / fine_label: they were refused ("no 'pixel_values'"),
    # and so was every streamed (IterableDataset) image dataset
    from datasets import Dataset, Image
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16,
                  patch_size=8, num_labels=4)
    )  # fmt: skip
    images = [PILImage.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)) for i in range(4)]
    rows = Dataset.from_dict({image_column: images, label_column: [3, 2, 1, 0]}).cast_column(image_column, Image())
    prepared = ensure_prepared(rows.to_iterable_dataset() if streaming else rows, model)
    got = list(prepared)
    assert [int(row["labels"]) for row in got] == [3, 2, 1, 0]
    assert all(tuple(torch.as_tensor(row["pixel_values"]).shape) == (3, 16, 16) for row in got)
    with_pixels = Dataset.from_dict({"pixel_values": np.zeros((2, 3, 16, 16), "float32")})
    assert ensure_prepared(with_pixels, model) is with_pixels


def test_undecoded_images_are_decoded_and_several_image_columns_are_refused():
    # Image(decode=False) rows reached the transform as {"bytes", "path"} dicts; two Image columns fell through to
    # "no 'pixel_values'"
    from datasets import Dataset, Image
    from transformers import ViTConfig, ViTForImageClassification

    from optimum_isoprune.errors import DataError

    model = ViTForImageClassification(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=16,
                  patch_size=8, num_labels=4)
    )  # fmt: skip
    images = [PILImage.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)) for i in range(2)]
    rows = Dataset.from_dict({"image": images, "label": [1, 0]}).cast_column("image", Image())
    decoded = [row["pixel_values"] for row in ensure_prepared(rows, model)]
    undecoded = ensure_prepared(rows.cast_column("image", Image(decode=False)), model)
    assert all(torch.equal(torch.as_tensor(row["pixel_values"]), d) for row, d in zip(undecoded, decoded))
    two = Dataset.from_dict({"image": images, "mask": images, "label": [1, 0]})
    two = two.cast_column("image", Image()).cast_column("mask", Image())
    with pytest.raises(DataError, match=r"2 image columns \['image', 'mask'\]"):
        ensure_prepared(two, model)


def test_text_labels_say_how_to_encode_them():
    # int('cat') failed inside the transform with "invalid literal for int() with base 10"
    from datasets import Dataset, Image
    from transformers import ViTConfig, ViTForImageClassification

    from optimum_isoprune import DataError

    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                                                patch_size=8, intermediate_size=64, num_labels=2))  # fmt: skip
    images = [PILImage.new("RGB", (16, 16)) for _ in range(2)]
    rows = Dataset.from_dict({"image": images, "label": ["cat", "dog"]}).cast_column("image", Image())
    with pytest.raises(DataError, match=r"class names \(text\).*class_encode_column\('label'\)"):
        prepare_dataset(rows, model=model)  # said before any work
    with pytest.raises(DataError, match="class_encode_column"):
        prepare_dataset(rows)[0]  # without a model: when the row is read
    assert prepare_dataset(rows.class_encode_column("label"), model=model)[1]["labels"] == 1
