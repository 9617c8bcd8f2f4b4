"""Dilated torchvision ResNet-50/101 as a DeepLabV3+ encoder.

The encoder keeps torchvision's module names (``conv1``, ``bn1``, ``layer1`` .. ``layer4``) and drops
only the classifier (``fc``), so torchvision's ImageNet files (``resnet101-*.pth``) load into it as they
are (their ``fc.*`` tensors are reported as unused).
"""

from __future__ import annotations

from typing import Literal

import torchvision
from torch import Tensor

from sclseg.models.deeplab import Encoder

__all__ = ["ResNetEncoder", "RESNET_DEPTHS"]

RESNET_DEPTHS = {50: torchvision.models.resnet50, 101: torchvision.models.resnet101}


class ResNetEncoder(Encoder):
    """``forward(x) -> (layer1, layer4)``: 256 channels at stride 4 and 2048 at stride 8 or 16.

    Output stride 8 dilates layer3 and layer4 (torchvision's ``replace_stride_with_dilation=[False,
    True, True]``); output stride 16 dilates layer4 only. Built with ``weights=None``: nothing is
    downloaded.
    """

    def __init__(self, depth: Literal[50, 101] = 101, output_stride: Literal[8, 16] = 8) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        dilate = [False, True, True] if output_stride == 8 else [False, False, True]
        net = RESNET_DEPTHS[depth](weights=None, replace_stride_with_dilation=dilate)
        self.depth = depth
        self.output_stride = output_stride
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.low_channels = 256
        self.high_channels = 2048

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return low, self.layer4(self.layer3(self.layer2(low)))
