"""Digit scenes: the embedded default dataset, built from real handwritten digits.

Source: the UCI "Optical Recognition of Handwritten Digits" test set (1,797 8x8 images of
digits written by 13 people, Alpaydin & Kaynak, CC BY 4.0) as bundled with scikit-learn
(``sklearn.datasets.load_digits``), so nothing is downloaded.

A scene is a ``S x S`` RGB canvas with a textured, coloured background (gradients, stripes,
smooth noise) and a few digits upscaled 3-5x with bilinear interpolation, each in its own
colour chosen to stand out from the background under it (a luminance gap of at least 0.3),
placed so that at most 10% of a digit's stroke falls on earlier digits (later digits are
drawn over earlier ones). The label of a pixel is ``1 + digit`` where
the digit's stroke covers it, else 0 (background): 11 classes. The digit instances are split
once, by a seeded permutation, into disjoint train / val / test pools, so no handwritten digit
appears in two splits. Everything is a deterministic function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sclseg.data.base import ClassInfo, JointTransform, SegmentationDataset

__all__ = ["DIGIT_CLASSES", "DigitScenes", "DigitScenesSplits", "digit_pools", "make_digit_scenes", "render_scene"]

DIGIT_CLASSES: list[ClassInfo] = [
    ClassInfo("background", (0, 0, 0)),
    ClassInfo("0", (230, 25, 75)),
    ClassInfo("1", (60, 180, 75)),
    ClassInfo("2", (255, 225, 25)),
    ClassInfo("3", (0, 130, 200)),
    ClassInfo("4", (245, 130, 48)),
    ClassInfo("5", (145, 30, 180)),
    ClassInfo("6", (70, 240, 240)),
    ClassInfo("7", (240, 50, 230)),
    ClassInfo("8", (210, 245, 60)),
    ClassInfo("9", (250, 190, 212)),
]

_POOL_SHARES = {"train": 0.6, "val": 0.15, "test": 0.25}
_STROKE_THRESHOLD = 0.5  # a pixel is labeled as the digit where its upscaled ink >= this
_MAX_OVERLAP = 0.1  # share of a new digit's stroke that may fall on earlier digits
_MIN_CONTRAST = 0.3  # luminance gap between a digit and the background under it
_PLACEMENT_TRIES = 30
_PATTERN_DEPTH = 0.45  # how much a class's stroke pattern darkens (or lightens) its colour


@dataclass
class DigitScenesSplits:
    """uint8 images ``(N, 3, S, S)`` and label maps ``(N, S, S)`` per split."""

    images: dict[str, Tensor]
    masks: dict[str, Tensor]


def digit_pools(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The disjoint train / val / test pools of digit instances: ink ``(N, 8, 8)`` in [0, 1] and
    digits ``(N,)`` in 0..9 per pool, split by a permutation seeded with ``seed``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ink = bunch.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    order = np.random.default_rng(seed).permutation(len(ink))
    n_train = int(_POOL_SHARES["train"] * len(ink))
    n_val = int(_POOL_SHARES["val"] * len(ink))
    cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {name: (ink[idx], bunch.target[idx]) for name, idx in cuts.items()}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A ``(3, S, S)`` float texture in [0, 1]: two colours blended by a random pattern."""
    c0, c1 = rng.uniform(0.0, 1.0, (2, 3, 1, 1))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = rng.integers(3)
    if kind == 0:  # linear gradient in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        pattern = (np.cos(angle) * xx + np.sin(angle) * yy + 1.0) / 2.0
    elif kind == 1:  # stripes of random frequency and orientation
        angle = rng.uniform(0, np.pi)
        freq = rng.uniform(2.0, 8.0)
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
    else:  # smooth noise
        coarse = torch.from_numpy(rng.uniform(0, 1, (1, 1, 5, 5)).astype(np.float32))
        pattern = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0, 0].numpy()
    pattern = np.clip(pattern, 0.0, 1.0)[None]
    texture = c0 * (1 - pattern) + c1 * pattern
    texture += rng.normal(0.0, 0.04, texture.shape)  # sensor-like noise
    return texture


def _stroke_pattern(digit: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """A ``(side, side)`` pattern in [0, 1] that is the digit class's local texture.

    Ten periodic patterns (stripes in four orientations and two periods, checks, dots, rings,
    solid) at a random phase: the class can be told from a small neighbourhood of its stroke,
    as road or foliage can in street scenes, not only from the whole digit's shape.
    """
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + rng.integers(0, 6, 2)[:, None, None]
    patterns = [
        lambda: np.ones_like(yy),
        lambda: (yy % 4 < 2),
        lambda: (xx % 4 < 2),
        lambda: ((yy + xx) % 4 < 2),
        lambda: ((yy - xx) % 4 < 2),
        lambda: ((yy // 2 + xx // 2) % 2 == 0),
        lambda: ((yy % 3 == 0) & (xx % 3 == 0)) == 0,
        lambda: (np.hypot(yy - side / 2, xx - side / 2) % 4 < 2),
        lambda: (yy % 6 < 3),
        lambda: (xx % 6 < 3),
    ]
    return patterns[digit]().astype(np.float32)


def _luminance(colour: np.ndarray) -> float:
    return float(0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2])


def render_scene(
    rng: np.random.Generator, ink: np.ndarray, labels: np.ndarray, size: int, n_range: tuple[int, int],
    scales: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``n_range`` digits drawn from ``ink``/``labels`` (a pool), upscaled ``scales``
    times, placed with little overlap, each in a colour that stands out from the background under
    it (luminance gap >= ``_MIN_CONTRAST``). Returns the uint8 image ``(3, S, S)`` and the label
    map ``(S, S)`` (``1 + digit`` on strokes, 0 elsewhere)."""
    image = _background(rng, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(rng.integers(n_range[0], n_range[1] + 1)):
        k = rng.integers(len(ink))
        side = 8 * int(rng.integers(scales[0], scales[1] + 1))
        glyph = torch.from_numpy(ink[k])[None, None]
        glyph = F.interpolate(glyph, size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()
        stroke = glyph >= _STROKE_THRESHOLD
        for _attempt in range(_PLACEMENT_TRIES):  # keep the most of every digit visible
            y, x = rng.integers(0, size - side + 1, 2)
            covered = mask[y : y + side, x : x + side][stroke] > 0
            if covered.mean() <= _MAX_OVERLAP:
                break
        region = image[:, y : y + side, x : x + side]
        under = _luminance(region[:, stroke].mean(axis=1)) if stroke.any() else 0.5
        for _attempt in range(_PLACEMENT_TRIES):
            colour = rng.uniform(0.0, 1.0, (3, 1, 1))
            if abs(_luminance(colour[:, 0, 0]) - under) >= _MIN_CONTRAST:
                break
        alpha = np.clip((glyph - 0.2) * 2.5, 0.0, 1.0)
        shade = 1.0 - _PATTERN_DEPTH * _stroke_pattern(int(labels[k]), side, rng)
        fill = colour * shade[None] if _luminance(colour[:, 0, 0]) > under else 1.0 - (1.0 - colour) * shade[None]
        image[:, y : y + side, x : x + side] = region * (1 - alpha) + fill * alpha
        mask[y : y + side, x : x + side][stroke] = labels[k] + 1
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8), mask


def make_digit_scenes(
    counts: dict[str, int],
    *,
    image_size: int = 64,
    min_digits: int = 2,
    max_digits: int = 4,
    digit_scale: tuple[int, int] = (3, 5),
    seed: int = 0,
) -> DigitScenesSplits:
    """Render ``counts[split]`` scenes per split from that split's own digit instances."""
    if min_digits < 1 or max_digits < min_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    if 8 * digit_scale[0] > image_size:
        raise ValueError(f"digit_scale {digit_scale} draws digits larger than image_size {image_size}")
    pools = digit_pools(seed)
    images, masks = {}, {}
    for offset, (split, count) in enumerate(sorted(counts.items())):
        if split not in pools:
            raise ValueError(f"unknown split '{split}', expected one of {sorted(pools)}")
        rng = np.random.default_rng([seed, offset, count])
        ink, labels = pools[split]
        rendered = [
            render_scene(rng, ink, labels, image_size, (min_digits, max_digits), digit_scale) for _ in range(count)
        ]
        if rendered:
            images[split] = torch.from_numpy(np.stack([r[0] for r in rendered]))
            masks[split] = torch.from_numpy(np.stack([r[1] for r in rendered]))
        else:
            images[split] = torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
            masks[split] = torch.zeros(0, image_size, image_size, dtype=torch.uint8)
    return DigitScenesSplits(images, masks)


class DigitScenes(SegmentationDataset):
    """A subset of rendered digit scenes as a :class:`SegmentationDataset`."""

    classes = DIGIT_CLASSES
    ignore_index = 255

    def __init__(
        self,
        images: Tensor,
        masks: Tensor,
        indices: Optional[np.ndarray] = None,
        *,
        split: str = "train",
        labeled: bool = True,
        transform: Optional[JointTransform] = None,
    ) -> None:
        super().__init__(labeled=labeled, transform=transform)
        self.images = images
        self.masks = masks
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices)
        self.split = split

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> tuple[Tensor, Optional[Tensor], str]:
        k = int(self.indices[index])
        return self.images[k], self.masks[k].long(), f"{self.split}_{k:05d}"
