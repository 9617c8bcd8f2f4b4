"""DPT on DINOv2 or DINOv3 (Ranftl et al., 2021; the segmentation network of UniMatch V2, Yang et al., 2024).

Layout and parameter names follow UniMatch V2's ``DPT``: ``encoder`` here is its ``backbone``
(Meta's DINOv2 keys, see :mod:`sclseg.models.dinov2`; timm's DINOv3 modules, see
:mod:`sclseg.models.dinov3`) and ``head`` its ``DPTHead`` key for key, so a UniMatch V2 checkpoint
maps onto this model by renaming ``module.backbone.`` to ``encoder.`` and ``module.head.`` to
``head.`` (and, for DINOv3, Meta's names onto timm's).

Head, from the patch tokens of four blocks ``(B, h*w, D)``, each reshaped to ``(B, D, h, w)``:
1x1 projections to ``out_channels``; resized to strides P/4, P/2, P, 2P for patch P (4x and 2x transposed
convs, identity, a stride-2 3x3 conv); 3x3 convs to ``features`` without bias; four fusion blocks
from the coarsest (two pre-activation residual units, bilinear upsampling with
``align_corners=True`` to the next map, or 2x for the last, a 1x1 conv); a 3x3 conv + ReLU and a
1x1 classifier at stride P/8; bilinear upsampling (``align_corners=True``) to the input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sclseg.models.deeplab import IMAGENET_MEAN, IMAGENET_STD, FeaturePerturbation
from sclseg.models.dinov2 import DINOv2Encoder
from sclseg.models.dinov3 import DINOv3Encoder

__all__ = ["DPT", "DPTHead", "DPT_SIZES", "DPT_ENCODERS"]

#: ``family`` -> encoder class (patch 14 for DINOv2, 16 for DINOv3; the same four token maps).
DPT_ENCODERS: dict[str, type[nn.Module]] = {"dinov2": DINOv2Encoder, "dinov3": DINOv3Encoder}

#: size -> (features, out_channels): UniMatch V2's ``model_configs``.
DPT_SIZES: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "small": (64, (48, 96, 192, 384)),
    "base": (128, (96, 192, 384, 768)),
    "large": (256, (256, 512, 1024, 1024)),
}


class ResidualConvUnit(nn.Module):
    """``x + conv2(relu(conv1(relu(x))))``, 3x3 convs with bias, no normalisation."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """``out_conv(upsample(unit2(x + unit1(skip))))``; without ``skip``, ``unit1`` is unused.

    Upsampling is bilinear with ``align_corners=True``, to ``size`` or by 2 when ``size`` is None.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Optional[Tensor] = None, size: Optional[Sequence[int]] = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(x)


class DPTHead(nn.Module):
    """Four token maps ``(B, h*w, D)`` -> logits ``(B, num_classes, 8h, 8w)``."""

    def __init__(self, num_classes: int, embed_dim: int, features: int, out_channels: Sequence[int]) -> None:
        super().__init__()
        c1, c2, c3, c4 = out_channels
        self.projects = nn.ModuleList([nn.Conv2d(embed_dim, c, 1) for c in out_channels])
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c1, c1, 4, stride=4),
            nn.ConvTranspose2d(c2, c2, 2, stride=2),
            nn.Identity(),
            nn.Conv2d(c4, c4, 3, stride=2, padding=1),
        ])
        self.scratch = nn.Module()
        for index, channels in enumerate(out_channels, start=1):
            setattr(self.scratch, f"layer{index}_rn", nn.Conv2d(channels, features, 3, padding=1, bias=False))
        for index in range(1, 5):
            setattr(self.scratch, f"refinenet{index}", FusionBlock(features))
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(features, features, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(features, num_classes, 1)
        )
        # the coarsest fusion block has no skip input: its first unit never gets a gradient (it is
        # kept for the published layout); frozen so that DDP does not wait for its gradients
        self.scratch.refinenet4.resConfUnit1.requires_grad_(False)

    def forward(self, tokens: Sequence[Tensor], grid_h: int, grid_w: int) -> Tensor:
        s = self.scratch
        maps = []
        for x, project, resize, rn in zip(tokens, self.projects, self.resize_layers,
                                          (s.layer1_rn, s.layer2_rn, s.layer3_rn, s.layer4_rn)):
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[-1], grid_h, grid_w)
            maps.append(rn(resize(project(x))))
        l1, l2, l3, l4 = maps
        x = s.refinenet4(l4, size=l3.shape[-2:])
        x = s.refinenet3(x, l3, size=l2.shape[-2:])
        x = s.refinenet2(x, l2, size=l1.shape[-2:])
        x = s.refinenet1(x, l1)
        return s.output_conv(x)


class DPT(nn.Module):
    """DINOv2 or DINOv3 encoder (``family``) + DPT head: images ``(B, 3, H, W)`` in ``[0, 1]`` -> logits
    ``(B, K, H, W)``.

    Images are normalised with ImageNet statistics inside (UniMatch V2's data pipeline does it
    outside), so ``DPT(x)`` equals UniMatch V2's ``DPT((x - mean) / std)``. Sides that are not a
    multiple of the patch (``encoder.patch_size``: 14 for DINOv2, 16 for DINOv3) are first resized
    bilinearly (``align_corners=True``) to the nearest multiple (at least one patch), and the logits,
    once at that size, resized back the same way: UniMatch V2's
    whole-image evaluation.
    """

    def __init__(self, size: str, num_classes: int, family: str = "dinov2") -> None:
        super().__init__()
        if size not in DPT_SIZES:
            raise ValueError(f"DPT size '{size}' is unknown; available: {', '.join(DPT_SIZES)}")
        if family not in DPT_ENCODERS:
            raise ValueError(f"DPT encoder family '{family}' is unknown; available: {', '.join(DPT_ENCODERS)}")
        features, out_channels = DPT_SIZES[size]
        self.encoder = DPT_ENCODERS[family](size)
        self.head = DPTHead(num_classes, self.encoder.embed_dim, features, out_channels)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.num_classes = num_classes

    def encode(self, images: Tensor) -> list[Tensor]:
        """The four token maps the head reads, each ``(B, h*w, D)`` on the patch grid of the
        images resized to patch multiples."""
        height, width = images.shape[-2:]
        x = (images - self.mean) / self.std
        patch = self.encoder.patch_size
        size = (_patch_multiple(height, patch), _patch_multiple(width, patch))
        if size != (height, width):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return list(self.encoder(x))

    def decode(self, features: list[Tensor], size: Sequence[int]) -> Tensor:
        """Logits ``(B, K, *size)`` from :meth:`encode`'s token maps of images of ``size``."""
        height, width = int(size[0]), int(size[1])
        patch = self.encoder.patch_size
        grid = (_patch_multiple(height, patch), _patch_multiple(width, patch))
        logits = self.head(features, grid[0] // patch, grid[1] // patch)
        logits = F.interpolate(logits, size=grid, mode="bilinear", align_corners=True)
        if grid != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=True)
        return logits

    def forward(self, images: Tensor, perturb: Optional[FeaturePerturbation] = None) -> Tensor:
        """Logits ``(B', K, H, W)`` of images ``(B, 3, H, W)``; ``perturb`` maps the features the
        head reads before it reads them (feature dropout; it may return a larger batch ``B'``)."""
        features = self.encode(images)
        return self.decode(features if perturb is None else perturb(features), images.shape[-2:])


def _patch_multiple(length: int, patch: int) -> int:
    """``length`` rounded to the nearest multiple of ``patch`` (halves up), at least one patch."""
    return max(1, int(length / patch + 0.5)) * patch
