"""Wider ResNet-38 "A2" (Rota Bulo et al., 2018) with dilation, the encoder of Zhu et al. (2019).

Layout (pre-activation residual blocks: BN-ReLU before every convolution)::

    mod1  3x3 conv, 64                                stride 1
    pool2 3x3 max-pool, stride 2
    mod2  3 blocks (128, 128)                         stride 2   <- low-level features
    pool3 3x3 max-pool, stride 2
    mod3  3 blocks (256, 256)                         stride 4
    mod4  6 blocks (512, 512), first one strided      stride 8
    mod5  3 blocks (512, 1024)          dilation 2    stride 8   (OS 16: first strided, dilation 1)
    mod6  1 bottleneck (512, 1024, 2048) dilation 4, channel dropout 0.3   (OS 16: dilation 2)
    mod7  1 bottleneck (1024, 2048, 4096) dilation 4, channel dropout 0.5  (OS 16: dilation 2)
    bn_out BN-ReLU on the 4096 channels                                    <- high-level features

Module and parameter names follow the public checkpoints of this network (``mod2.block1.bn1.0.weight``,
``mod2.block1.convs.conv1.weight``, ``mod2.block1.proj_conv.weight``, ``bn_out.0.weight``, ...), so an
ImageNet ``wider_resnet38.pth.tar`` loads into :class:`WiderResNet38` without renaming.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal, Optional, Sequence

from torch import Tensor, nn

from sclseg.models.deeplab import Encoder

__all__ = ["WiderResNet38", "PreActBlock", "WRN38_STRUCTURE", "WRN38_CHANNELS"]

WRN38_STRUCTURE = (3, 3, 6, 3, 1, 1)  # blocks in mod2 .. mod7
WRN38_CHANNELS = ((128, 128), (256, 256), (512, 512), (512, 1024), (512, 1024, 2048), (1024, 2048, 4096))


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class PreActBlock(nn.Module):
    """Identity-mapping residual block: ``out = convs(bn_relu(x)) + shortcut``.

    ``channels`` of length 2 gives two 3x3 convolutions; of length 3 a 1x1 - 3x3 - 1x1 bottleneck.
    The stride sits on the first convolution, the dilation on the 3x3 ones. Channel dropout
    (``Dropout2d``), when asked for, acts before the last convolution. Where the shape changes the
    shortcut is a 1x1 convolution of the pre-activated input, otherwise the input itself.
    """

    def __init__(
        self, cin: int, channels: Sequence[int], *, stride: int = 1, dilation: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if len(channels) not in (2, 3):
            raise ValueError(f"channels must have 2 or 3 entries, got {tuple(channels)}")
        self.bn1 = _bn_relu(cin)
        d = dilation
        if len(channels) == 2:
            c1, c2 = channels
            layers: list[tuple[str, nn.Module]] = [
                ("conv1", nn.Conv2d(cin, c1, 3, stride=stride, padding=d, dilation=d, bias=False)),
                ("bn2", _bn_relu(c1)),
                ("conv2", nn.Conv2d(c1, c2, 3, padding=d, dilation=d, bias=False)),
            ]
        else:
            c1, c2, c3 = channels
            layers = [
                ("conv1", nn.Conv2d(cin, c1, 1, stride=stride, bias=False)),
                ("bn2", _bn_relu(c1)),
                ("conv2", nn.Conv2d(c1, c2, 3, padding=d, dilation=d, bias=False)),
                ("bn3", _bn_relu(c2)),
                ("conv3", nn.Conv2d(c2, c3, 1, bias=False)),
            ]
        if dropout > 0:
            layers.insert(len(layers) - 1, ("dropout", nn.Dropout2d(dropout)))
        self.convs = nn.Sequential(OrderedDict(layers))
        self.proj_conv: Optional[nn.Conv2d] = None
        if stride != 1 or cin != channels[-1]:
            self.proj_conv = nn.Conv2d(cin, channels[-1], 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.bn1(x)
        shortcut = x if self.proj_conv is None else self.proj_conv(pre)
        return self.convs(pre) + shortcut


class WiderResNet38(Encoder):
    """The dilated Wider ResNet-38 A2 trunk; ``forward(x) -> (mod2 output, final BN-ReLU output)``.

    ``output_stride=8``: stride 2 in mod4's first block, dilation 2 in mod5 and 4 in mod6-7 (Zhu et al.).
    ``output_stride=16``: stride 2 also in mod5's first block, dilations halved (1 in mod5, 2 in mod6-7).
    The low-level features are mod2's output (stride 2, 128 channels), taken before the second
    max-pool; the high-level features have 4096 channels.
    """

    #: Zhu et al.'s whole-model checkpoints (DeepWV3Plus, e.g. Cityscapes or Mapillary trained) do not
    #: use the trunk's final BN-ReLU and so lack ``bn_out``; it then keeps its initial values.
    optional_pretrained_prefixes = ("bn_out.",)

    def __init__(self, output_stride: Literal[8, 16] = 8, *, dropout: tuple[float, float] = (0.3, 0.5)) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        self.output_stride = output_stride
        os16 = output_stride == 16
        #        mod2 mod3 mod4       mod5                 mod6                   mod7
        strides = (1, 1, 2, 2 if os16 else 1, 1, 1)
        dilations = (1, 1, 1, 1 if os16 else 2, 2 if os16 else 4, 2 if os16 else 4)
        drops = (0.0, 0.0, 0.0, 0.0, dropout[0], dropout[1])

        self.mod1 = nn.Sequential(OrderedDict([("conv1", nn.Conv2d(3, 64, 3, padding=1, bias=False))]))
        self.pool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.pool3 = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for i, (n_blocks, channels) in enumerate(zip(WRN38_STRUCTURE, WRN38_CHANNELS)):
            blocks = []
            for b in range(n_blocks):
                block = PreActBlock(
                    cin, channels, stride=strides[i] if b == 0 else 1, dilation=dilations[i], dropout=drops[i]
                )
                blocks.append((f"block{b + 1}", block))
                cin = channels[-1]
            self.add_module(f"mod{i + 2}", nn.Sequential(OrderedDict(blocks)))
        self.bn_out = _bn_relu(cin)
        self.low_channels = WRN38_CHANNELS[0][-1]
        self.high_channels = cin
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low = self.mod2(self.pool2(self.mod1(x)))
        x = self.mod3(self.pool3(low))
        x = self.mod7(self.mod6(self.mod5(self.mod4(x))))
        return low, self.bn_out(x)
