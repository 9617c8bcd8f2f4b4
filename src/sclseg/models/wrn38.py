"""Zhu et al.'s DeepLabV3+ on a dilated Wider ResNet-38 "A2" (Rota Bulo et al., 2018).

:class:`DeepWV3Plus` computes what ``DeepWV3Plus`` of NVIDIA's ``semantic-segmentation`` (branch
``sdcnet``, the code of Zhu et al., 2019) computes. Its ``state_dict`` has that network's key names,
the trunk's under ``encoder.`` (NVIDIA's ``mod1.conv1.weight`` is ``encoder.mod1.conv1.weight`` here;
``aspp.features.0.0.weight`` is the same), so NVIDIA's files load through
:mod:`sclseg.models.weights` with exactly that renaming.

Trunk (pre-activation residual blocks: BN-ReLU before every convolution)::

    mod1  3x3 conv, 64                                stride 1
    pool2 3x3 max-pool, stride 2
    mod2  3 blocks (128, 128)                         stride 2   <- low-level features
    pool3 3x3 max-pool, stride 2
    mod3  3 blocks (256, 256)                         stride 4
    mod4  6 blocks (512, 512), first one strided      stride 8
    mod5  3 blocks (512, 1024)          dilation 2    stride 8   (OS 16: first strided, dilation 1)
    mod6  1 bottleneck (512, 1024, 2048) dilation 4, channel dropout 0.3   (OS 16: dilation 2)
    mod7  1 bottleneck (1024, 2048, 4096) dilation 4, channel dropout 0.5  (OS 16: dilation 2)
                                                                   <- high-level features (raw)

The ImageNet classifier's final ``bn_out`` (BN-ReLU) and ``classifier.fc`` are not part of the
segmentation network: ASPP reads mod7's output as it is.

Head (every upsampling bilinear with ``align_corners=True``)::

    aspp      image pooling, 1x1, 3x3 at rates 12/24/36 (OS 16: 6/12/18); each conv-BN-ReLU, 256 ch.,
              concatenated in that order (1280 channels)
    bot_aspp  1x1 conv 1280 -> 256 (no BN, no ReLU), upsampled to mod2's resolution
    bot_fine  1x1 conv 128 -> 48 on mod2's output (no BN, no ReLU)
    final     [bot_fine, bot_aspp] (304 ch.) -> 3x3 conv-BN-ReLU 256 -> 3x3 conv-BN-ReLU 256
              -> 1x1 conv to the classes (no bias), upsampled to the input
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal, Optional

import torch
from torch import Tensor, nn

from sclseg.models.deeplab import IMAGENET_MEAN, IMAGENET_STD, FeaturePerturbation, conv_bn_relu, upsample_aligned

__all__ = ["DeepWV3Plus", "WiderResNet38", "PreActBlock", "NvidiaASPP", "WRN38_STRUCTURE", "WRN38_CHANNELS"]

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


class WiderResNet38(nn.Module):
    """The dilated Wider ResNet-38 A2 trunk; ``forward(x) -> (mod2 output, mod7 output)``.

    ``x`` is ``(B, 3, H, W)`` normalised with the ImageNet statistics; the outputs are
    ``(B, 128, H/2, W/2)`` and ``(B, 4096, H/8, W/8)`` (``H/16`` with ``output_stride=16``).
    ``output_stride=8``: stride 2 in mod4's first block, dilation 2 in mod5 and 4 in mod6-7 (Zhu et al.).
    ``output_stride=16``: stride 2 also in mod5's first block, dilations halved (1 in mod5, 2 in mod6-7).
    Parameters keep PyTorch's default initialisation, as the reference's trunk.
    """

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
        self.low_channels = WRN38_CHANNELS[0][-1]
        self.high_channels = cin

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low = self.mod2(self.pool2(self.mod1(x)))
        x = self.mod3(self.pool3(low))
        return low, self.mod7(self.mod6(self.mod5(self.mod4(x))))


class NvidiaASPP(nn.Module):
    """ASPP of the reference: ``(B, cin, h, w) -> (B, 5 * cout, h, w)``, unprojected.

    Output channels in order: image pooling (``img_conv``), the 1x1 (``features.0``), the 3x3 at
    each rate (``features.1..``); every branch conv (no bias) - BN - ReLU.
    """

    def __init__(self, cin: int, cout: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.features = nn.ModuleList(
            [conv_bn_relu(cin, cout, 1)] + [conv_bn_relu(cin, cout, 3, dilation=r) for r in rates]
        )
        self.img_pooling = nn.AdaptiveAvgPool2d(1)
        self.img_conv = conv_bn_relu(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = upsample_aligned(self.img_conv(self.img_pooling(x)), x.shape[-2:])
        return torch.cat([pooled] + [branch(x) for branch in self.features], dim=1)


class DeepWV3Plus(nn.Module):
    """Zhu et al.'s segmentation network: images ``(B, 3, H, W)`` in ``[0, 1]`` -> logits ``(B, K, H, W)``.

    ``encoder`` is the trunk; the head's modules (``aspp``, ``bot_fine``, ``bot_aspp``, ``final``)
    carry the reference's names, so the ``state_dict`` keys are the reference's with the trunk's
    under ``encoder.`` (:mod:`sclseg.models.weights` maps one onto the other). Images are
    normalised inside with the ImageNet mean and std (the reference normalises in its data
    pipeline). ``final`` is initialised as the reference does (Kaiming-normal convolutions, fan-in);
    everything else keeps PyTorch's defaults.
    """

    def __init__(self, num_classes: int, output_stride: Literal[8, 16] = 8) -> None:
        super().__init__()
        self.encoder = WiderResNet38(output_stride)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)
        self.aspp = NvidiaASPP(self.encoder.high_channels, 256, rates)
        self.bot_fine = nn.Conv2d(self.encoder.low_channels, 48, 1, bias=False)
        self.bot_aspp = nn.Conv2d(256 * (len(rates) + 2), 256, 1, bias=False)
        self.final = nn.Sequential(
            nn.Conv2d(256 + 48, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, num_classes, 1, bias=False),
        )
        for m in self.final.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        self.num_classes = num_classes

    def encode(self, images: Tensor) -> list[Tensor]:
        """The features the head reads, ``[low (B, C_low, h_low, w_low), high (B, C_high, h, w)]``."""
        return list(self.encoder((images - self.mean) / self.std))

    def decode(self, features: list[Tensor], size: Sequence[int]) -> Tensor:
        """Logits ``(B, K, *size)`` from :meth:`encode`'s features."""
        low, high = features
        context = upsample_aligned(self.bot_aspp(self.aspp(high)), low.shape[-2:])
        logits = self.final(torch.cat([self.bot_fine(low), context], dim=1))
        return upsample_aligned(logits, size)

    def forward(self, images: Tensor, perturb: Optional[FeaturePerturbation] = None) -> Tensor:
        """Logits ``(B', K, H, W)`` of images ``(B, 3, H, W)``; ``perturb`` maps the features the
        head reads before it reads them (feature dropout; it may return a larger batch ``B'``)."""
        features = self.encode(images)
        return self.decode(features if perturb is None else perturb(features), images.shape[-2:])
