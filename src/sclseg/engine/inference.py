"""Inference: whole image, sliding windows (three placements), multi-scale and horizontal flip.

Scores are softmax probabilities. Each scale's scores are resized back to the input size, and
all scales and flips are averaged. Sliding windows (``protocol``):

- ``"tiles"``: ``tile``-sized windows, ``overlap`` apart, the last flush with the border; an image
  smaller than a tile is zero-padded at the bottom/right. Each pixel's scores are divided by the
  number of windows that covered it.
- ``"unimatch_v1"`` (UniMatch V1's ``evaluate``, ``sliding_window``): square windows of side
  ``window`` (801 on Cityscapes) starting at ``0, s, 2s, ...`` while inside the image,
  ``s = int(window * 2 / 3)`` (534), each clipped at the image border (the last ones are smaller).
- ``"unimatch_v2"`` (UniMatch V2's ``evaluate``): windows of side ``window`` (798, a multiple of
  DINOv2's patch 14) at ``0, s, 2s, ...`` (``s = 532``) with the last one shifted back to end at
  the border, so every window has the full size; a side shorter than the window gets one window
  of that side's length.

Both UniMatch protocols sum the softmax of the windows (no padding, no resizing); here the sum is
divided by the per-pixel window count, which keeps probabilities and leaves the argmax as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "UNIMATCH_WINDOWS",
    "predict_probs",
    "tile_starts",
    "unimatch_stride",
    "unimatch_v1_windows",
    "unimatch_v2_windows",
    "window_mode_name",
]

Protocol = Literal["tiles", "unimatch_v1", "unimatch_v2"]
PROTOCOLS: tuple[str, ...] = ("tiles", "unimatch_v1", "unimatch_v2")
#: The window side of each UniMatch protocol on Cityscapes (its training crop size).
UNIMATCH_WINDOWS = {"unimatch_v1": 801, "unimatch_v2": 798}

Span = tuple[int, int]  # half-open [start, stop) along one side


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``, the last flush at the end."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(count)})


def unimatch_stride(window: int) -> int:
    """The stride of both UniMatch protocols: two thirds of the window, rounded down."""
    return int(window * 2 / 3)


def unimatch_v1_windows(length: int, window: int) -> list[Span]:
    """UniMatch V1's windows along a side: starts ``0, s, 2s, ... < length``, clipped at ``length``."""
    stride = unimatch_stride(window)
    return [(start, min(length, start + window)) for start in range(0, length, stride)]


def unimatch_v2_windows(length: int, window: int) -> list[Span]:
    """UniMatch V2's windows along a side: full ``window`` spans, the last ending at ``length``."""
    if length <= window:
        return [(0, length)]
    stride, start, spans = unimatch_stride(window), 0, []
    while True:
        spans.append((start, start + window))
        if start == length - window:
            return spans
        start = min(start + stride, length - window)


def _summed(model: nn.Module, images: Tensor, rows: Sequence[Span], cols: Sequence[Span]) -> Tensor:
    """Softmax scores ``(B, K, H, W)`` of the windows ``rows x cols``, summed per pixel, over the count."""
    batch, _, height, width = images.shape
    total: Optional[Tensor] = None
    count = torch.zeros(1, 1, height, width, device=images.device)
    for y0, y1 in rows:
        for x0, x1 in cols:
            probs = model(images[:, :, y0:y1, x0:x1]).float().softmax(dim=1)
            if total is None:
                total = torch.zeros(batch, probs.shape[1], height, width, device=images.device)
            total[:, :, y0:y1, x0:x1] += probs
            count[:, :, y0:y1, x0:x1] += 1
    return total / count


def _tiles(model: nn.Module, images: Tensor, tile: Sequence[int], overlap: float) -> Tensor:
    """Probabilities ``(B, K, H, W)`` from overlapping ``tile``-sized windows (zero-padded if larger)."""
    th, tw = tile
    height, width = images.shape[-2:]
    pad_h, pad_w = max(0, th - height), max(0, tw - width)
    padded = F.pad(images, (0, pad_w, 0, pad_h)) if pad_h or pad_w else images
    ph, pw = padded.shape[-2:]
    sh, sw = max(1, int(th * (1 - overlap))), max(1, int(tw * (1 - overlap)))
    rows = [(y, y + th) for y in tile_starts(ph, th, sh)]
    cols = [(x, x + tw) for x in tile_starts(pw, tw, sw)]
    return _summed(model, padded, rows, cols)[:, :, :height, :width]


def _windows(model: nn.Module, images: Tensor, protocol: Protocol, tile: Optional[Sequence[int]], overlap: float
             ) -> Tensor:
    """Probabilities ``(B, K, H, W)`` of one (scaled, flipped) batch under ``protocol``."""
    if protocol == "tiles":
        return _tiles(model, images, tile, overlap) if tile else model(images).float().softmax(dim=1)
    window_h, window_w = tile if tile else (UNIMATCH_WINDOWS[protocol],) * 2
    spans = unimatch_v1_windows if protocol == "unimatch_v1" else unimatch_v2_windows
    height, width = images.shape[-2:]
    return _summed(model, images, spans(height, window_h), spans(width, window_w))


def window_mode_name(protocol: str, tile: Optional[Sequence[int]]) -> str:
    """How one pass covers the image: ``whole``, ``sliding`` (tiles), ``unimatch_v1_801``, ..."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "tiles":
        return "sliding" if tile else "whole"
    window_h, window_w = tile if tile else (UNIMATCH_WINDOWS[protocol],) * 2
    return f"{protocol}_{window_h}" if window_h == window_w else f"{protocol}_{window_h}x{window_w}"


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: Tensor,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    tile: Optional[Sequence[int]] = None,
    overlap: float = 1.0 / 3.0,
    protocol: Protocol = "tiles",
) -> Tensor:
    """Class probabilities ``(B, K, H, W)`` for images ``(B, 3, H, W)`` in ``[0, 1]``.

    ``protocol="tiles"``: the whole image (``tile=None``) or ``tile``-sized windows ``overlap``
    apart. ``"unimatch_v1"`` / ``"unimatch_v2"``: the UniMatch window placements (module doc),
    with windows of ``tile`` (H, W) when given, else of the protocol's Cityscapes side; ``overlap``
    is not used there (their stride is two thirds of the window).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    height, width = images.shape[-2:]
    total: Optional[Tensor] = None
    runs = 0
    for scale in scales:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        scaled = images if size == (height, width) else F.interpolate(images, size=size, mode="bilinear",
                                                                      align_corners=False)
        for flipped in (False, True) if flip else (False,):
            inp = scaled.flip(-1) if flipped else scaled
            probs = _windows(model, inp, protocol, tile, overlap)
            if flipped:
                probs = probs.flip(-1)
            if probs.shape[-2:] != (height, width):
                probs = F.interpolate(probs, size=(height, width), mode="bilinear", align_corners=False)
            total = probs if total is None else total + probs
            runs += 1
    return total / runs
