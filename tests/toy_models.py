"""Small deterministic networks shared by the inference tests."""

from __future__ import annotations

import torch
from torch import nn


class Pointwise(nn.Module):
    """A 1x1 convolution: receptive field of one pixel, so tiles and windows cannot change its output."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
