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
