"""calibration.py: every form of calibration data becomes the same (pixel_values, labels) batches, or a clear error."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch

from optimum_isoprune.calibration import calibration_batches, check_batch
from optimum_isoprune.errors import CalibrationDataError, NonFiniteError

IMAGES = torch.arange(5 * 1 * 2 * 2, dtype=torch.float32).reshape(5, 1, 2, 2)
LABELS = torch.tensor([0, 1, 2, 1, 0])


def test_a_tensor_a_dataloader_and_a_dataset_give_the_same_images():
    from_tensor = list(calibration_batches(IMAGES, batch_size=2, max_batches=10, seed=0))
    assert [len(x) for x, _ in from_tensor] == [2, 2, 1] and all(y is None for _, y in from_tensor)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(IMAGES, LABELS), batch_size=2)
    from_loader = list(calibration_batches(loader, batch_size=99, max_batches=10, seed=0))
    torch.testing.assert_close(torch.cat([x for x, _ in from_loader]), IMAGES)
    assert torch.cat([y for _, y in from_loader]).tolist() == LABELS.tolist()
    rows = datasets.Dataset.from_dict({"pixel_values": IMAGES.numpy(), "labels": LABELS.numpy()}).with_format("torch")
    from_rows = list(calibration_batches(rows, batch_size=2, max_batches=2, seed=0))
    assert len(from_rows) == 2 and all(x.shape == (2, 1, 2, 2) and y.dtype == torch.int64 for x, y in from_rows)
    # shuffled with the seed: the same seed gives the same order
    again = list(calibration_batches(rows, batch_size=2, max_batches=2, seed=0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(from_rows, again))


def test_bad_calibration_data_says_what_is_wrong():
    with pytest.raises(CalibrationDataError, match=r"\(N, C, H, W\)"):
        list(calibration_batches(IMAGES[0], batch_size=2, max_batches=1, seed=0))
    with pytest.raises(CalibrationDataError, match="Unsupported calibration data of type list"):
        calibration_batches([1, 2, 3], batch_size=2, max_batches=1, seed=0)
    rows = datasets.Dataset.from_dict({"image": np.zeros((2, 4))})
    with pytest.raises(CalibrationDataError, match="no 'pixel_values'"):
        list(calibration_batches(rows, batch_size=2, max_batches=1, seed=0))
    broken = IMAGES.clone()
    broken[3, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="calibration batch 1"):
        list(calibration_batches(broken, batch_size=2, max_batches=10, seed=0))
    with pytest.raises(CalibrationDataError, match=r"expected \(batch, 3, 2, 2\)"):
        check_batch((IMAGES, None), num_channels=3, image_size=2)


def test_lists_arrays_and_processor_outputs_give_the_same_images():
    expected = list(calibration_batches(IMAGES, batch_size=2, max_batches=10, seed=0))
    forms = [
        list(IMAGES),  # a list of (C, H, W) tensors
        IMAGES.numpy(),
        {"pixel_values": IMAGES, "labels": LABELS},  # an image processor's BatchFeature is such a mapping
        [{"pixel_values": x, "labels": int(y)} for x, y in zip(IMAGES, LABELS)],
    ]
    for data in forms:
        got = list(calibration_batches(data, batch_size=2, max_batches=10, seed=0))
        assert [x.shape for x, _ in got] == [x.shape for x, _ in expected]
        torch.testing.assert_close(torch.cat([x for x, _ in got]), IMAGES)
        if isinstance(data, dict) or isinstance(data[0], dict):
            assert torch.cat([y for _, y in got]).tolist() == LABELS.tolist()
    with pytest.raises(CalibrationDataError, match="differ in shape"):
        calibration_batches([IMAGES[0], IMAGES[0, :, :1]], batch_size=2, max_batches=1, seed=0)
    with pytest.raises(CalibrationDataError, match=r"5 calibration images but labels of shape \(4,\)"):
        calibration_batches({"pixel_values": IMAGES, "labels": LABELS[:4]}, batch_size=2, max_batches=1, seed=0)
    with pytest.raises(CalibrationDataError, match="it is empty"):
        calibration_batches([], batch_size=2, max_batches=1, seed=0)


def test_integer_pixels_are_refused_not_fed_raw():
    # uint8 0..255 images went through as floats: importance ranked on inputs the model never sees
    raw = torch.randint(0, 255, (4, 3, 2, 2), dtype=torch.uint8)
    for data in (raw, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(raw), batch_size=2)):
        with pytest.raises(CalibrationDataError, match="are torch.uint8, not normalised floats.*image processor"):
            list(calibration_batches(data, batch_size=2, max_batches=2, seed=0))
    floats = list(calibration_batches(IMAGES.double(), batch_size=2, max_batches=1, seed=0))
    assert floats[0][0].dtype == torch.float32


def test_a_dataloader_that_cannot_collate_says_what_to_pass():
    from PIL import Image

    rows = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (2, 2)) for _ in range(4)], "label": [0, 1, 0, 1]}
    ).cast_column("image", datasets.Image())
    loader = torch.utils.data.DataLoader(rows, batch_size=2)  # default_collate cannot stack PIL images
    with pytest.raises(CalibrationDataError, match="could not be batched.*Image column itself"):
        list(calibration_batches(loader, batch_size=2, max_batches=1, seed=0))


def test_a_torch_dataset_is_batched_and_a_dict_of_splits_names_them():
    # a TensorDataset was "Unsupported"; load_dataset(name) without split= read as rows without 'pixel_values'
    got = list(calibration_batches(torch.utils.data.TensorDataset(IMAGES, LABELS), batch_size=2, max_batches=9, seed=0))
    assert [len(x) for x, _ in got] == [2, 2, 1]
    order = torch.cat([y for _, y in got])
    assert sorted(order.tolist()) == sorted(LABELS.tolist())
    again = list(calibration_batches(torch.utils.data.TensorDataset(IMAGES, LABELS), 2, 9, seed=0))
    assert torch.equal(torch.cat([y for _, y in again]), order)  # shuffled with the seed
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"pixel_values": IMAGES.numpy()})})
    with pytest.raises(CalibrationDataError, match=r"dict of splits \['train'\]: pass one"):
        calibration_batches(splits, batch_size=2, max_batches=1, seed=0)


def test_one_hot_and_column_labels_become_class_indices():
    # (N, 1) and one-hot labels reached cross_entropy ("multi-target not supported", "Expected floating point type")
    one_hot = torch.nn.functional.one_hot(LABELS, 3)
    for labels in (LABELS.view(-1, 1), one_hot, one_hot.float()):
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(IMAGES, labels), batch_size=2)
        got = list(calibration_batches(loader, batch_size=2, max_batches=10, seed=0))
        assert torch.cat([y for _, y in got]).tolist() == LABELS.tolist()
    rows = [{"pixel_values": x, "labels": y} for x, y in zip(IMAGES, one_hot)]  # were flattened to 3 labels an image
    assert torch.cat([y for _, y in calibration_batches(rows, 2, 10, 0)]).tolist() == LABELS.tolist()
    two_hot = one_hot.clone()
    two_hot[0] = 1
    with pytest.raises(CalibrationDataError, match=r"shape \(2, 3\) for 2 images: give one class index per image"):
        list(calibration_batches({"pixel_values": IMAGES, "labels": two_hot}, batch_size=2, max_batches=1, seed=0))
