"""What the package knows about the layers it prunes (Linear and Conv2d): their widths, and whether they mix channels."""

from __future__ import annotations

from typing import Any

from torch import nn


def channels(layer: nn.Linear | nn.Conv2d, is_out: bool = True) -> int:
    """Output (or input) channels of a Linear or Conv2d."""
    if isinstance(layer, nn.Linear):
        return layer.out_features if is_out else layer.in_features
    return layer.out_channels if is_out else layer.in_channels


def mixes_channels(layer: Any) -> bool:
    """A Linear or ungrouped Conv2d: each output reads every input channel (a removed input can be refit around)."""
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)
