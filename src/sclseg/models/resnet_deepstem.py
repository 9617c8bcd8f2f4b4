"""UniMatch V1's DeepLabV3+ (Yang et al., 2023) on a deep-stem ResNet-50/101 ("ResNet-C").

The network the community's semi-supervised Cityscapes and Pascal VOC results use (CPS, U2PL,
UniMatch). :class:`DeepStemDeepLabV3Plus` computes what UniMatch's ``DeepLabV3Plus`` computes and has
its ``state_dict`` key names, the backbone's under ``encoder.`` where UniMatch has ``backbone.``
(:mod:`sclseg.models.weights` maps one onto the other):

Backbone (``encoder``, timm's ``ResNet(stem_type="deep", stem_width=64)``, which has exactly the
keys and features of UniMatch's ``resnet101.pth``)::

    conv1   3x3 conv 3 -> 64 stride 2, BN, ReLU, 3x3 conv 64 -> 64, BN, ReLU, 3x3 conv 64 -> 128
    bn1     BN + ReLU, then a 3x3 max-pool, stride 2                      stride 4
    layer1  Bottlenecks (stride on the 3x3 conv), 256 ch.                 stride 4   <- c1
    layer2 .. layer4: [4, 23, 3] (R101) or [4, 6, 3] (R50) blocks, 512 / 1024 / 2048 ch.
            OS 16: layer4 dilated (its 3x3 dilations 1, 2, 2);  OS 8: layer3 and layer4  <- c4

Head (every upsampling bilinear with ``align_corners=True``)::

    head        ASPP on c4, 2048 -> 256 per branch: b0 1x1, b1-b3 3x3 at rates 6/12/18 (OS 8: 12/24/36),
                b4 image pooling; each conv-BN-ReLU; concatenated b0..b4 and projected 1280 -> 256
                (conv-BN-ReLU, no dropout)
    reduce      1x1 conv-BN-ReLU 256 -> 48 on c1
    fuse        [reduce(c1), head upsampled to c1] (304 ch.) -> two 3x3 conv-BN-ReLU, 256
    classifier  1x1 conv with bias to the classes, upsampled to the input
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Optional

import torch
from timm.models.resnet import Bottleneck, ResNet
from torch import Tensor, nn

from sclseg.models.deeplab import IMAGENET_MEAN, IMAGENET_STD, FeaturePerturbation, conv_bn_relu, upsample_aligned

__all__ = ["DeepStemDeepLabV3Plus", "UniMatchASPP", "deep_stem_resnet", "DEEPSTEM_LAYERS"]

DEEPSTEM_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def deep_stem_resnet(depth: Literal[50, 101], output_stride: Literal[8, 16]) -> ResNet:
    """timm's deep-stem ResNet without classifier, dilated to ``output_stride``, UniMatch's initialisation.

    Convolutions Kaiming-normal (fan-out), BN weight 1 and bias 0, the last BN of each block not
    zeroed (UniMatch's ``zero_init_residual=False``).
    """
    if depth not in DEEPSTEM_LAYERS:
        raise ValueError(f"depth must be one of {sorted(DEEPSTEM_LAYERS)}, got {depth}")
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    return ResNet(
        Bottleneck,
        list(DEEPSTEM_LAYERS[depth]),
        stem_type="deep",
        stem_width=64,
        output_stride=output_stride,
        num_classes=0,
        zero_init_last=False,
    )


class UniMatchASPP(nn.Module):
    """``(B, cin, h, w) -> (B, cin // 8, h, w)``: branches ``b0`` (1x1), ``b1-b3`` (3x3 at ``rates``),
    ``b4`` (image pooling, ``b4.gap``), concatenated in that order and projected (``project``)."""

    def __init__(self, cin: int, rates: Sequence[int]) -> None:
        super().__init__()
        cout = cin // 8
        if len(rates) != 3:
            raise ValueError(f"UniMatch's ASPP has three rates, got {tuple(rates)}")
        self.b0 = conv_bn_relu(cin, cout, 1)
        self.b1, self.b2, self.b3 = (conv_bn_relu(cin, cout, 3, dilation=r) for r in rates)
        self.b4 = nn.Module()
        self.b4.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(cin, cout, 1))
        self.project = conv_bn_relu(5 * cout, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = upsample_aligned(self.b4.gap(x), x.shape[-2:])
        return self.project(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x), pooled], dim=1))


class DeepStemDeepLabV3Plus(nn.Module):
    """Images ``(B, 3, H, W)`` in ``[0, 1]`` -> logits ``(B, num_classes, H, W)``.

    Images are normalised inside with the ImageNet mean and std (UniMatch normalises in its data
    pipeline). ``encoder`` is the backbone (UniMatch's ``backbone``); the head keeps PyTorch's
    default initialisation, as UniMatch's.
    """

    def __init__(
        self, num_classes: int, depth: Literal[50, 101] = 101, output_stride: Literal[8, 16] = 16
    ) -> None:
        super().__init__()
        self.encoder = deep_stem_resnet(depth, output_stride)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        low_channels, high_channels = 256, 2048
        self.head = UniMatchASPP(high_channels, (6, 12, 18) if output_stride == 16 else (12, 24, 36))
        self.reduce = conv_bn_relu(low_channels, 48, 1)
        self.fuse = nn.Sequential(
            *conv_bn_relu(high_channels // 8 + 48, 256, 3), *conv_bn_relu(256, 256, 3)
        )
        self.classifier = nn.Conv2d(256, num_classes, 1, bias=True)
        self.num_classes = num_classes

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(c1, c4)`` of normalised images: layer1's and layer4's outputs."""
        b = self.encoder
        c1 = b.layer1(b.maxpool(b.act1(b.bn1(b.conv1(x)))))
        return c1, b.layer4(b.layer3(b.layer2(c1)))

    def encode(self, images: Tensor) -> list[Tensor]:
        """The features the head reads, ``[low (B, C_low, h_low, w_low), high (B, C_high, h, w)]``."""
        return list(self.features((images - self.mean) / self.std))

    def decode(self, features: list[Tensor], size: Sequence[int]) -> Tensor:
        """Logits ``(B, K, *size)`` from :meth:`encode`'s features (UniMatch V1's ``_decode``)."""
        c1, c4 = features
        context = upsample_aligned(self.head(c4), c1.shape[-2:])
        logits = self.classifier(self.fuse(torch.cat([self.reduce(c1), context], dim=1)))
        return upsample_aligned(logits, size)

    def forward(self, images: Tensor, perturb: Optional[FeaturePerturbation] = None) -> Tensor:
        """Logits ``(B', K, H, W)`` of images ``(B, 3, H, W)``; ``perturb`` maps the features the
        head reads before it reads them (feature dropout; it may return a larger batch ``B'``)."""
        features = self.encode(images)
        return self.decode(features if perturb is None else perturb(features), images.shape[-2:])
