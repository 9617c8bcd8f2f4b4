"""Inference: whole image, overlapping tiles, multi-scale and horizontal flip.

Scores are softmax probabilities. Tiles overlap and each pixel's scores are divided by the
number of tiles that covered it (exact averaging); each scale's scores are resized back to
the input size, and all scales and flips are averaged.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["predict_probs", "tile_starts"]


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``, the last flush at the end."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(count)})


def _sliding(model: nn.Module, images: Tensor, tile: Sequence[int], overlap: float) -> Tensor:
    """Probabilities ``(B, K, H, W)`` from overlapping ``tile``-sized windows."""
    th, tw = tile
    batch, _, height, width = images.shape
    pad_h, pad_w = max(0, th - height), max(0, tw - width)
    padded = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
    ph, pw = padded.shape[-2:]
    sh, sw = max(1, int(th * (1 - overlap))), max(1, int(tw * (1 - overlap)))
    total: Optional[Tensor] = None
    count = torch.zeros(1, 1, ph, pw, device=images.device)
    for y in tile_starts(ph, th, sh):
        for x in tile_starts(pw, tw, sw):
            probs = model(padded[:, :, y : y + th, x : x + tw]).float().softmax(dim=1)
            if total is None:
                total = torch.zeros(batch, probs.shape[1], ph, pw, device=images.device)
            total[:, :, y : y + th, x : x + tw] += probs
            count[:, :, y : y + th, x : x + tw] += 1
    return (total / count)[:, :, :height, :width]


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: Tensor,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    tile: Optional[Sequence[int]] = None,
    overlap: float = 1.0 / 3.0,
) -> Tensor:
    """Class probabilities ``(B, K, H, W)`` for images ``(B, 3, H, W)`` in ``[0, 1]``."""
    height, width = images.shape[-2:]
    total: Optional[Tensor] = None
    runs = 0
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = images if size == (height, width) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            inp = scaled.flip(-1) if flipped else scaled
            probs = _sliding(model, inp, tile, overlap) if tile else model(inp).float().softmax(dim=1)
            if flipped:
                probs = probs.flip(-1)
            if probs.shape[-2:] != (height, width):
                probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
            total = probs if total is None else total + probs
            runs += 1
    return total / runs
