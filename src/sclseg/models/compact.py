"""A compact residual encoder small enough to train on 2 CPU cores (the embedded default)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from sclseg.models.deeplab import Encoder, conv_bn_relu

__all__ = ["CompactEncoder"]


class _Residual(nn.Module):
    def __init__(self, cin: int, cout: int, *, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(cin, cout, 3, stride=stride, dilation=dilation if stride == 1 else 1),
            nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.skip(x))


class CompactEncoder(Encoder):
    """Stem at stride 2 (the low-level features), then residual stages to stride 8 or 16.

    With ``width=w`` the channels are w (stride 2), 2w (4), 4w (8) and 4w (8 or 16, dilated
    at output stride 8).
    """

    def __init__(self, width: int = 32, output_stride: Literal[8, 16] = 8) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(conv_bn_relu(3, w, 3, stride=2), conv_bn_relu(w, w, 3))
        self.stage2 = _Residual(w, 2 * w, stride=2)
        self.stage3 = _Residual(2 * w, 4 * w, stride=2)
        last_stride, dilation = (1, 2) if output_stride == 8 else (2, 1)
        self.stage4 = nn.Sequential(
            _Residual(4 * w, 4 * w, stride=last_stride, dilation=1),
            _Residual(4 * w, 4 * w, dilation=dilation),
        )
        self.low_channels = w
        self.high_channels = 4 * w

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low = self.stem(x)
        return low, self.stage4(self.stage3(self.stage2(low)))
