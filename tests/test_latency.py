import pytest
import torch
from torch import nn

from optimum_isoprune.latency import compare_latency, describe_machine, measure_latency


class Recorder(nn.Module):
    """A tiny conv classifier that remembers the shapes it was called with and whether grad was on."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.head = nn.Linear(width, 10)
        self.shapes = []
        self.inference_mode = []

    def forward(self, pixel_values):
        self.shapes.append(tuple(pixel_values.shape))
        self.inference_mode.append(torch.is_inference_mode_enabled())
        return self.head(self.conv(pixel_values).mean((2, 3)))


def test_returns_positive_numbers_and_machine():
    result = measure_latency(Recorder(), image_size=16, repeats=5, warmup=2)
    assert result["median_ms"] > 0 and result["min_ms"] > 0 and result["mean_ms"] > 0
    assert result["min_ms"] <= result["median_ms"]
    assert result["per_image_ms"] == result["median_ms"]
    assert torch.__version__ in result["machine"] and "cores" in result["machine"]
    assert result["machine"] == describe_machine()


@pytest.mark.parametrize("batch_size", [1, 4])
def test_respects_batch_size_shape_and_counts(batch_size):
    model = Recorder()
    result = measure_latency(model, image_size=(12, 20), num_channels=3, batch_size=batch_size, repeats=3, warmup=2)
    assert model.shapes == [(batch_size, 3, 12, 20)] * 5
    assert all(model.inference_mode)
    assert result["batch_size"] == batch_size and result["input_shape"] == [batch_size, 3, 12, 20]
    assert result["per_image_ms"] == pytest.approx(result["median_ms"] / batch_size)


def test_training_flag_is_restored():
    model = Recorder().train()
    measure_latency(model, image_size=8, repeats=1, warmup=0)
    assert model.training
    model.eval()
    measure_latency(model, image_size=8, repeats=1, warmup=0)
    assert not model.training


def test_compare_latency_uses_same_settings():
    base, pruned = Recorder(16), Recorder(4)
    result = compare_latency(base, pruned, image_size=8, batch_size=2, repeats=2, warmup=1)
    assert set(result) == {"before", "after"}
    assert base.shapes == pruned.shapes == [(2, 3, 8, 8)] * 3
    assert result["before"]["machine"] == result["after"]["machine"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
        ({"image_size": 0}, "image_size"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    kwargs = {"image_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        measure_latency(Recorder(), **kwargs)
