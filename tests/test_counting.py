"""counting.py: MACs and params as arithmetic on layer widths (the budget evaluates thousands of widths with it)."""

from __future__ import annotations

import torch
from torch import nn

from optimum_isoprune.counting import CostModel, count_params


def _mlp_and_conv() -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.depthwise, self.fc1, self.fc2 = conv, depthwise, fc1, fc2

        def forward(self, x):
            tokens = self.depthwise(self.conv(x)).flatten(2).transpose(1, 2)  # (1, 25 positions, 8 channels)
            return self.fc2(torch.relu(self.fc1(tokens)))

    return Net(), conv, depthwise, fc1


def test_macs_and_params_follow_the_layer_widths():
    model, conv, depthwise, fc1 = _mlp_and_conv()
    cost = CostModel(model, torch.zeros(1, 3, 5, 5), [], lambda m, x: m(x))
    positions = 25
    full = positions * (8 * 3 * 9 + 8 * 9 + 8 * 16 + 16 * 4)  # conv, depthwise (one filter per channel), fc1, fc2
    assert cost.macs() == full
    assert cost.params() == count_params(model)
    # Four hidden MLP neurons (fc1 outputs = fc2 inputs) and two conv channels (through the depthwise conv into fc1).
    removed = {
        (id(fc1), True): 4,
        (id(model.fc2), False): 4,
        (id(conv), True): 2,
        (id(depthwise), True): 2,
        (id(depthwise), False): 2,
        (id(fc1), False): 2,
    }
    assert cost.macs(removed) == positions * (6 * 3 * 9 + 6 * 9 + 6 * 12 + 12 * 4)
    pruned_params = (6 * 27 + 6) + (6 * 9 + 6) + (6 * 12 + 12) + (12 * 4 + 4)
    assert cost.params(removed, {(id(depthwise), True): 8}) == pruned_params


def test_recording_measures_during_a_forward_pass_that_runs_anyway():
    model, *_ = _mlp_and_conv()
    x = torch.zeros(1, 3, 5, 5)
    with CostModel.recording(model, []) as recorded:
        model(x)
    assert recorded.macs() == CostModel(model, x, [], lambda m, x: m(x)).macs()
