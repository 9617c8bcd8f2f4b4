"""DeepLabV3+ (Chen et al., 2018) around any encoder that returns low- and high-level features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ASPP", "DeepLabV3Plus", "Encoder", "FeaturePerturbation", "conv_bn_relu", "upsample_aligned"]

#: A map over the features a segmentation head reads (every sclseg network's ``encode`` gives them:
#: ``(B, C, h, w)`` maps, or ``(B, N, D)`` token maps for the ViTs), e.g. UniMatch's feature dropout.
FeaturePerturbation = Callable[[list[Tensor]], list[Tensor]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, *, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def upsample_aligned(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of ``(B, C, h, w)`` to ``size`` with ``align_corners=True`` (the resize of
    NVIDIA's and UniMatch's networks)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class Encoder(nn.Module):
    """Interface: ``forward(x) -> (low, high)`` with ``low_channels`` and ``high_channels``."""

    low_channels: int
    high_channels: int


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: image pooling, 1x1 and one 3x3 branch per rate."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int], dropout: float = 0.1) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(cin, cout, 1))
        self.branches = nn.ModuleList([conv_bn_relu(cin, cout, 1)] + [conv_bn_relu(cin, cout, 3,
                                                                                   dilation=r) for r in rates])
        self.project = nn.Sequential(conv_bn_relu(cout * (len(rates) + 2), cout, 1), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([pooled] + [b(x) for b in self.branches], dim=1))


class DeepLabV3Plus(nn.Module):
    """Encoder -> ASPP -> upsample to the low-level features -> two 3x3 convs -> classifier.

    Takes images ``(B, 3, H, W)`` in ``[0, 1]`` (normalised inside with ImageNet statistics)
    and returns logits ``(B, num_classes, H, W)`` at input resolution.
    """

    def __init__(
        self,
        encoder: Encoder,
        num_classes: int,
        *,
        aspp_rates: Sequence[int],
        aspp_channels: int = 256,
        low_level_channels: int = 48,
        decoder_channels: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.aspp = ASPP(encoder.high_channels, aspp_channels, aspp_rates, dropout)
        self.low_proj = conv_bn_relu(encoder.low_channels, low_level_channels, 1)
        self.decoder = nn.Sequential(
            conv_bn_relu(aspp_channels + low_level_channels, decoder_channels, 3),
            conv_bn_relu(decoder_channels, decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)
        self.num_classes = num_classes

    def encode(self, images: Tensor) -> list[Tensor]:
        """The features the head reads, ``[low (B, C_low, h_low, w_low), high (B, C_high, h, w)]``."""
        return list(self.encoder((images - self.mean) / self.std))

    def decode(self, features: list[Tensor], size: Sequence[int]) -> Tensor:
        """Logits ``(B, K, *size)`` from :meth:`encode`'s features."""
        low, high = features
        context = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False)
        fused = self.decoder(torch.cat([context, self.low_proj(low)], dim=1))
        return F.interpolate(self.classifier(fused), size=tuple(size), mode="bilinear", align_corners=False)

    def forward(self, images: Tensor, perturb: Optional[FeaturePerturbation] = None) -> Tensor:
        """Logits ``(B', K, H, W)`` of images ``(B, 3, H, W)``; ``perturb`` maps the features the
        head reads before it reads them (feature dropout; it may return a larger batch ``B'``)."""
        features = self.encode(images)
        return self.decode(features if perturb is None else perturb(features), images.shape[-2:])
