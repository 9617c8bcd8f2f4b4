"""Joint augmentation of image and label with torchvision transforms v2.

Geometry (random scale, crop with ignore padding, optional flip) moves image and
``tv_tensors.Mask`` together; photometric changes (colour jitter, Gaussian blur) touch the
image only. Zhu et al.'s recipe is scale 0.5-2.0, crop, flip, blur, colour jitter; the digit
scenes use no flip (a mirrored 2 is no 2).
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ["TrainTransform"]


class TrainTransform:
    """``(image (3, H, W) float, mask (H, W) or None) -> (image, mask)`` of size ``crop_size``."""

    def __init__(
        self,
        crop_size: Sequence[int],
        *,
        base_size: int,
        scale_range: Sequence[float] = (0.5, 2.0),
        hflip: bool = True,
        color_jitter: float = 0.25,
        blur_prob: float = 0.5,
        ignore_index: int = 255,
    ) -> None:
        lo, hi = scale_range
        steps: list = []
        if (lo, hi) != (1.0, 1.0) or base_size != min(crop_size):  # identity geometry: skip resampling
            steps += [
                v2.RandomResize(max(1, int(round(lo * base_size))), max(2, int(round(hi * base_size)) + 1)),
                v2.RandomCrop(
                    list(crop_size),
                    pad_if_needed=True,
                    fill={tv_tensors.Image: 0.0, tv_tensors.Mask: ignore_index},
                ),
            ]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        if color_jitter > 0:
            j = color_jitter
            steps.append(v2.RandomApply([v2.ColorJitter(j, j, j, min(0.5, j / 4))], p=0.8))
        if blur_prob > 0:
            # sigma <= 2 px: a 9-tap kernel (+-2 sigma) suffices; larger kernels only cost time
            kernel = min(9, max(3, (min(crop_size) // 32) * 2 + 1))
            steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_prob))
        self.pipeline = v2.Compose(steps)

    def __call__(self, image: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        if mask is None:
            return self.pipeline(tv_tensors.Image(image)).as_subclass(Tensor), None
        out_image, out_mask = self.pipeline(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return out_image.as_subclass(Tensor), out_mask.as_subclass(Tensor)
