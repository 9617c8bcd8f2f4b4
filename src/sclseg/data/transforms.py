"""Photometric augmentation of a whole batch on the training device: colour jitter and blur.

The geometry of a training crop (random scale, crop with ignore padding, flip) moves image and
label together and is done per sample by :class:`~sclseg.data.class_uniform.TrainingView`. The
photometric part touches the image only and is the costly part (a hue shift converts every
pixel to HSV and back), so it runs once per batch where the network runs, with each image's own
parameters: :meth:`PhotometricAugment.draw` draws one image's parameters (in the data stream,
under that sample's seed, so a batch stays a pure function of the stream's seeds), and
:meth:`PhotometricAugment.__call__` applies a batch of them.

Zhu et al.'s recipe: with probability 0.8 a colour jitter of brightness, contrast and saturation
factors uniform in ``[max(0, 1 - j), 1 + j]`` and a hue shift uniform in ``[-h, h]``
(``h = min(0.5, j / 4)``), then with probability ``blur_prob`` a Gaussian blur with sigma uniform
in ``[0.1, 2.0]``. Each adjustment is the one of torchvision's ``transforms.v2.functional``
(``adjust_brightness``, ``adjust_contrast``, ``adjust_saturation``, ``adjust_hue``,
``gaussian_blur`` with reflect padding) with a factor per image. The jitter applies its four
adjustments in that fixed order (torchvision's ``ColorJitter`` shuffles the order per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from sclseg.config import DataConfig

__all__ = [
    "PARAMS",
    "PhotometricAugment",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "blur_kernel_size",
    "build_photometric",
    "gaussian_blur",
]

#: The columns of a parameter row: jitter on (1) or off (0), the brightness, contrast and
#: saturation factors, the hue shift, the blur sigma (0: no blur), grayscale on (1) or off (0).
PARAMS = ("jitter", "brightness", "contrast", "saturation", "hue", "sigma", "gray")

_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision's rgb_to_grayscale
_BLUR_SIGMA = (0.1, 2.0)


def _per_image(factors: Tensor, images: Tensor) -> Tensor:
    """``(B,)`` factors as ``(B, 1, 1, 1)`` in the images' dtype."""
    return factors.to(images.dtype).view(-1, 1, 1, 1)


def _grayscale(images: Tensor) -> Tensor:
    """``(B, 3, H, W) -> (B, 1, H, W)`` luma."""
    r, g, b = images.unbind(1)
    return (r * _GRAY[0] + g * _GRAY[1] + b * _GRAY[2]).unsqueeze(1)


def _blend(images: Tensor, other: Tensor, factors: Tensor) -> Tensor:
    ratio = _per_image(factors, images)
    return (ratio * images + (1.0 - ratio) * other).clamp_(0.0, 1.0)


def adjust_brightness(images: Tensor, factors: Tensor) -> Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1] times ``factors (B,)``, clipped to [0, 1]."""
    return (images * _per_image(factors, images)).clamp_(0.0, 1.0)


def adjust_contrast(images: Tensor, factors: Tensor) -> Tensor:
    """Each image blended with the mean of its luma: ``f * x + (1 - f) * mean``, clipped."""
    return _blend(images, _grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factors)


def adjust_saturation(images: Tensor, factors: Tensor) -> Tensor:
    """Each image blended with its luma per pixel: ``f * x + (1 - f) * gray``, clipped."""
    return _blend(images, _grayscale(images), factors)


def _rgb_to_hsv(images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, 3, H, W)`` RGB in [0, 1] -> hue in [0, 1), saturation, value, each ``(B, H, W)``."""
    r, g, b = images.unbind(1)
    value, argmax = images.max(dim=1)
    chroma = value - images.amin(dim=1)
    flat = chroma == 0
    safe = torch.where(flat, torch.ones_like(chroma), chroma)
    sector = torch.where(argmax == 0, (g - b) / safe, torch.where(argmax == 1, (b - r) / safe + 2.0,
                                                                  (r - g) / safe + 4.0))
    hue = torch.where(flat, torch.zeros_like(sector), sector).div_(6.0).remainder_(1.0)
    saturation = chroma / torch.where(value == 0, torch.ones_like(value), value)
    return hue, saturation, value


def _hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """Inverse of :func:`_rgb_to_hsv`: channel ``n`` (5: red, 3: green, 1: blue) is
    ``v - v s clip(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h) mod 6``."""
    sixths = hue * 6.0
    chroma = value * saturation
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (sixths + n).remainder_(6.0)
        channels.append(value - chroma * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(channels, dim=1).clamp_(0.0, 1.0)


def adjust_hue(images: Tensor, shifts: Tensor) -> Tensor:
    """Each image's hue turned by ``shifts (B,)`` (in turns, within [-0.5, 0.5]) in HSV space."""
    hue, saturation, value = _rgb_to_hsv(images)
    hue = (hue + shifts.to(hue.dtype).view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(hue, saturation, value)


def gaussian_blur(images: Tensor, sigmas: Tensor, kernel_size: int) -> Tensor:
    """Each image blurred with its own Gaussian of ``sigmas (B,)`` (0: unchanged), a square odd
    ``kernel_size`` and reflect padding; separable, as two grouped convolutions."""
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    batch, channels, height, width = images.shape
    offsets = torch.arange(kernel_size, device=images.device, dtype=images.dtype) - kernel_size // 2
    sigma = sigmas.to(images.dtype).clamp_min(1e-12).view(-1, 1)  # a vanishing sigma is the identity kernel
    kernel = torch.softmax(-(offsets / sigma).square() / 2.0, dim=1)  # (B, K), each row sums to 1
    kernel = kernel.repeat_interleave(channels, dim=0)  # (B * C, K)
    pad = kernel_size // 2
    x = F.pad(images.reshape(1, batch * channels, height, width), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)
    x = F.conv2d(x, kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return x.view(batch, channels, height, width)


def blur_kernel_size(crop_size: tuple[int, int] | list[int]) -> int:
    """The blur's kernel for a crop: ``2 (min side // 32) + 1`` taps, 3 to 9 (sigma <= 2 px
    needs no more than +-2 sigma)."""
    return min(9, max(3, (min(crop_size) // 32) * 2 + 1))


@dataclass(frozen=True)
class PhotometricAugment:
    """Colour jitter of strength ``color_jitter`` (probability ``jitter_prob``), grayscale
    (probability ``grayscale_prob``) and Gaussian blur (probability ``blur_prob``, ``blur_kernel``
    taps) with per-image parameters, applied in that order."""

    color_jitter: float
    blur_prob: float
    blur_kernel: int
    jitter_prob: float = 0.8
    hue: Optional[float] = None  # the hue shift's bound; None: min(0.5, color_jitter / 4)
    grayscale_prob: float = 0.0

    def draw(self, generator: Optional[torch.Generator] = None) -> Tensor:
        """One image's parameters, a float ``(7,)`` row laid out as :data:`PARAMS` (torch RNG)."""
        return self.draw_batch(1, generator)[0]

    def draw_batch(self, count: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``count`` images' parameters ``(count, 7)``, on the generator's device (CPU without one).

        Row ``i`` takes 7 uniforms (8 with a grayscale probability) from the generator in turn:
        jitter on, three factors, the hue shift, blur on, the blur sigma (and grayscale on)."""
        device = generator.device if generator is not None else None
        u = torch.rand(count, 7 + (self.grayscale_prob > 0), generator=generator, dtype=torch.float64, device=device)
        j = self.color_jitter
        lo, hi = max(0.0, 1.0 - j), 1.0 + j
        hue = min(0.5, j / 4) if self.hue is None else self.hue
        jitter = ((u[:, 0] < self.jitter_prob) & (j > 0)).double()
        blurred = (u[:, 5] < self.blur_prob) & (self.blur_prob > 0)
        sigma = torch.where(blurred, _BLUR_SIGMA[0] + (_BLUR_SIGMA[1] - _BLUR_SIGMA[0]) * u[:, 6], 0.0)
        gray = (u[:, 7] < self.grayscale_prob).double() if self.grayscale_prob > 0 else torch.zeros_like(sigma)
        factors = lo + (hi - lo) * u[:, 1:4]
        shift = hue * (2.0 * u[:, 4] - 1.0)
        return torch.cat([jitter[:, None], factors, shift[:, None], sigma[:, None], gray[:, None]], dim=1).float()

    def __call__(self, images: Tensor, params: Tensor) -> Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] with parameter rows ``(B, 7)`` -> augmented images."""
        params = params.to(images.device)
        out = images
        if self.color_jitter > 0:
            jittered = adjust_brightness(images, params[:, 1])
            jittered = adjust_contrast(jittered, params[:, 2])
            jittered = adjust_hue(adjust_saturation(jittered, params[:, 3]), params[:, 4])
            out = torch.where(params[:, 0].view(-1, 1, 1, 1) > 0, jittered, images)
        if self.grayscale_prob > 0:
            out = torch.where(params[:, 6].view(-1, 1, 1, 1) > 0, _grayscale(out).expand_as(out), out)
        if self.blur_prob > 0:
            out = gaussian_blur(out, params[:, 5], self.blur_kernel)
        return out


def build_photometric(data: DataConfig) -> Optional[PhotometricAugment]:
    """The training streams' photometric augmentation for ``data`` (None when it has none)."""
    if data.color_jitter <= 0 and data.blur_prob <= 0:
        return None
    return PhotometricAugment(float(data.color_jitter), float(data.blur_prob), blur_kernel_size(data.crop_size))
