"""Training crops: random scale + crop with ignore padding, class-uniform for a share of them.

Class-uniform sampling (Zhu et al., "Improving Semantic Segmentation via Video Propagation and
Label Relaxation", CVPR 2019): every labeled label map is cut into ``tile_size`` tiles; for each
class present in a tile, its centroid (mean pixel position in the tile) is recorded. When a
labeled sample is drawn, with probability ``fraction`` a class is chosen uniformly among the
classes that occur anywhere in the labeled set, then one of its recorded centroids uniformly;
the crop is taken from that centroid's image with the centroid at a random position inside it:
along each axis the crop's start is uniform among the starts whose crop holds the centroid, then
moved into the image where the crop would leave it (NVIDIA's ``RandomCrop`` with a centroid draws
from one more start, which puts the centroid just outside the crop). Otherwise the sampler's own
image is cropped at a random position. Rare classes are thus seen as often as common ones.

Departure from Zhu et al.'s code, on purpose: a centroid of a non-convex region can fall outside
it, so each centroid is snapped to the class pixel nearest to it (ties: first in row-major
order). A class-centred crop therefore always contains a pixel of its class (before the
resampling; a region thinner than ``1 / scale`` pixels can vanish when the crop is downscaled).

Centroid lists are computed once per labeled file list and cached (``.npz``, keyed by the
label files' paths relative to the dataset root and their sizes, the tile size and the number
of classes), by default in ``<dataset root>/.sclseg_cache``.

:class:`TrainingView` applies it all: it wraps a :class:`SegmentationDataset` and does the
scale, crop and optional horizontal flip of every training crop (the crop window is cut from
the original image first and only the window is resampled, which is cheap on 2048x1024 images).
Image and label go through the same geometric operations. Colour jitter and blur come later,
on the whole batch (:mod:`sclseg.data.transforms`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from sclseg.data.base import Sample, SegmentationDataset

__all__ = [
    "Centroids",
    "TrainingView",
    "centroid_cache_key",
    "class_centroids",
    "scale_crop",
    "tile_centroids",
]

Centroids = dict  # {class index: int64 array (K, 3) of (image index, y, x)}
_CACHE_VERSION = 1


def tile_centroids(label: np.ndarray, num_classes: int, tile_size: int) -> np.ndarray:
    """``(K, 3)`` int64 rows ``(class, y, x)``: one per (tile, class present in the tile).

    ``(y, x)`` (image coordinates) is the pixel of that class in that tile nearest to the mean
    position of the class's pixels in the tile. Values outside ``[0, num_classes)`` (ignore)
    are skipped. Tiles are ``tile_size`` squares from the top-left; the last row/column of
    tiles may be smaller.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {label.shape}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    height, width = label.shape
    # class keys in the smallest unsigned type: NumPy's stable argsort is a radix sort for them
    key_type = np.uint8 if num_classes < 255 else np.uint16 if num_classes < 65535 else np.int64
    rows: list[np.ndarray] = []
    for y0 in range(0, height, tile_size):
        for x0 in range(0, width, tile_size):
            tile = label[y0 : y0 + tile_size, x0 : x0 + tile_size]
            tw = tile.shape[1]
            flat = tile.ravel()
            keys = np.where((flat >= 0) & (flat < num_classes), flat, num_classes).astype(key_type)
            counts = np.bincount(keys, minlength=num_classes + 1)[:num_classes]
            if not counts.any():
                continue
            order = np.argsort(keys, kind="stable")  # pixels grouped by class, row-major within a class
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            for c in np.flatnonzero(counts):
                pixels = order[starts[c] : starts[c] + counts[c]]
                yc, xc = pixels // tw, pixels % tw
                my, mx = yc.mean(), xc.mean()
                k = int(np.argmin((yc - my) ** 2 + (xc - mx) ** 2))
                rows.append(np.array([c, y0 + yc[k], x0 + xc[k]], dtype=np.int64))
    return np.stack(rows) if rows else np.zeros((0, 3), dtype=np.int64)


def centroid_cache_key(label_files: Sequence[Union[str, Path]], root: Optional[Path], num_classes: int,
                       tile_size: int) -> str:
    """A hash of the file list (paths relative to ``root``, file sizes) and the parameters."""
    h = hashlib.sha1()
    h.update(json.dumps({"v": _CACHE_VERSION, "classes": num_classes, "tile": tile_size}).encode())
    for f in label_files:
        path = Path(f)
        try:
            name = str(path.resolve().relative_to(root.resolve())) if root is not None else str(path)
        except ValueError:
            name = str(path.resolve())
        h.update(f"{name}\0{path.stat().st_size}\n".encode())
    return h.hexdigest()[:20]


def _label_loader(dataset: SegmentationDataset) -> Callable[[int], Union[Tensor, np.ndarray]]:
    for method in ("load_label_array", "load_label"):  # the narrowest dtype first: faster sorting
        loader = getattr(dataset, method, None)
        if loader is not None:
            return loader
    return lambda i: dataset.load(i)[1]


def _compute(dataset: SegmentationDataset, tile_size: int, num_workers: int, progress: bool) -> Centroids:
    load = _label_loader(dataset)
    num_classes = dataset.num_classes

    def one(i: int) -> np.ndarray:
        label = load(i)
        if label is None:
            raise ValueError(f"class-uniform sampling needs labels; item {i} of {type(dataset).__name__} has none")
        rows = tile_centroids(np.asarray(label), num_classes, tile_size)
        return np.concatenate([np.full((len(rows), 1), i, dtype=np.int64), rows], axis=1)

    n = len(dataset)
    if progress:
        print(f"class-uniform sampling: computing centroids of {n} label maps ...", file=sys.stderr, flush=True)
    if num_workers > 1:
        with ThreadPoolExecutor(num_workers) as pool:  # PIL decodes without the GIL
            parts = list(pool.map(one, range(n)))
    else:
        parts = [one(i) for i in range(n)]
    table = np.concatenate(parts) if parts else np.zeros((0, 4), dtype=np.int64)
    return {c: table[table[:, 1] == c][:, [0, 2, 3]].copy() for c in range(num_classes) if (table[:, 1] == c).any()}


def class_centroids(
    dataset: SegmentationDataset,
    *,
    tile_size: int = 1024,
    cache_dir: Optional[Union[str, Path]] = None,
    num_workers: int = 0,
    progress: bool = True,
) -> Centroids:
    """Per-class centroid lists of a labeled dataset: ``{class: (K, 3) [image index, y, x]}``.

    With ``cache_dir``, the lists are read from / written to ``cache_dir/class_uniform_<key>.npz``
    (key: :func:`centroid_cache_key`; needs ``dataset.label_files``). Classes that never occur are
    absent from the dict.
    """
    cache_path: Optional[Path] = None
    label_files = getattr(dataset, "label_files", None)
    if cache_dir is not None and label_files is not None:
        key = centroid_cache_key(label_files, getattr(dataset, "root", None), dataset.num_classes, tile_size)
        cache_path = Path(cache_dir) / f"class_uniform_{key}.npz"
        if cache_path.is_file():
            with np.load(cache_path) as data:
                return {int(k[1:]): data[k] for k in data.files if k.startswith("c")}
    centroids = _compute(dataset, tile_size, num_workers, progress)
    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_path.parent, suffix=".npz.tmp")
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **{f"c{c}": rows for c, rows in centroids.items()})
            os.replace(tmp, cache_path)  # atomic: concurrent writers (ranks) cannot corrupt it
        except OSError as exc:
            print(f"class-uniform sampling: could not write the cache {cache_path} ({exc}); "
                  "set data.class_uniform.cache_dir to a writable folder", file=sys.stderr)
    return centroids


def _window_start(size: int, window: int, center: Optional[int]) -> int:
    """Top/left of a ``window`` on an axis of ``size`` pixels (torch RNG).

    Without ``center``: uniform over the windows inside the axis. With ``center``: uniform over the
    starts ``center - window + 1 .. center`` (the centre at any position of the window), then
    clamped into the axis, which keeps the centre inside. A window at least as long as the axis
    covers all of it, the image at a random place inside the window.
    """
    if window >= size:
        return -int(torch.randint(0, window - size + 1, ()))
    if center is None:
        return int(torch.randint(0, size - window + 1, ()))
    start = center - window + 1 + int(torch.randint(0, window, ()))
    return min(max(start, 0), size - window)


def _cut(x: Tensor, y0: int, x0: int, h: int, w: int, fill: float) -> Tensor:
    """``x[..., y0:y0+h, x0:x0+w]`` with ``fill`` where the window leaves the image."""
    height, width = x.shape[-2:]
    if y0 >= 0 and x0 >= 0 and y0 + h <= height and x0 + w <= width:
        return x[..., y0 : y0 + h, x0 : x0 + w]
    out = torch.full((*x.shape[:-2], h, w), fill, dtype=x.dtype)
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + h, height), min(x0 + w, width)
    if sy1 > sy0 and sx1 > sx0:
        out[..., sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = x[..., sy0:sy1, sx0:sx1]
    return out


def scale_crop(
    image: Tensor,
    mask: Optional[Tensor],
    crop_size: Sequence[int],
    scale: float,
    *,
    center: Optional[tuple[int, int]] = None,
    ignore_index: int = 255,
) -> tuple[Tensor, Optional[Tensor]]:
    """Rescale by ``scale`` and crop ``crop_size``: equivalent to resizing the whole image, then
    cropping, but only the ``crop / scale`` window is resampled.

    ``center=(y, x)`` (source pixel) lies at a random position inside the window; ``None``: the
    window is placed at random (torch RNG). Outside the image: 0 for the image, ``ignore_index`` for
    the mask. Images resample bilinearly with antialiasing, masks with exact nearest neighbour. A uint8 image comes back
    as float in ``[0, 1]`` (only the window is converted).
    """
    ch, cw = int(crop_size[0]), int(crop_size[1])
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    height, width = image.shape[-2:]
    wh, ww = max(1, int(round(ch / scale))), max(1, int(round(cw / scale)))
    y0 = _window_start(height, wh, None if center is None else int(center[0]))
    x0 = _window_start(width, ww, None if center is None else int(center[1]))
    win = _cut(image, y0, x0, wh, ww, 0)
    win = win.float().div_(255.0) if win.dtype == torch.uint8 else win.float()
    if (wh, ww) != (ch, cw):
        win = TF.resize(tv_tensors.Image(win), [ch, cw], antialias=True).as_subclass(Tensor)
    out_mask = None
    if mask is not None:
        m = _cut(mask, y0, x0, wh, ww, ignore_index)
        if (wh, ww) != (ch, cw):
            m = TF.resize(tv_tensors.Mask(m[None]), [ch, cw], interpolation=InterpolationMode.NEAREST_EXACT)
            m = m.as_subclass(Tensor)[0]
        out_mask = m
    return win, out_mask


class TrainingView(SegmentationDataset):
    """Augmented training samples of ``base`` (whose own ``transform`` is not used).

    Per sample (torch RNG, so the stream's per-sample seeds make it reproducible): a scale
    uniform in ``scale_range``; for a labeled view with ``centroids``, with probability
    ``fraction`` a class-centred crop (class uniform among the classes with centroids, then a
    centroid uniform; the image is the centroid's, not ``index``'s), else a random crop of
    ``index``; then, with ``hflip``, a horizontal flip with probability 0.5. The centroid lies at a
    random position in its crop (see :func:`scale_crop`).
    """

    def __init__(
        self,
        base: SegmentationDataset,
        *,
        crop_size: Sequence[int],
        scale_range: Sequence[float] = (0.5, 2.0),
        hflip: bool = False,
        centroids: Optional[Centroids] = None,
        fraction: float = 0.0,
    ) -> None:
        super().__init__(labeled=base.labeled)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"class-uniform fraction must be in [0, 1], got {fraction}")
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be [low, high] with 0 < low <= high, got {list(scale_range)}")
        self.base = base
        self.classes = base.classes
        self.ignore_index = base.ignore_index
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (lo, hi)
        self.hflip = hflip
        self.centroids = {c: np.asarray(v) for c, v in (centroids or {}).items() if len(v)}
        self.centroid_classes = sorted(self.centroids)
        self.fraction = fraction if self.centroid_classes and base.labeled else 0.0

    def __len__(self) -> int:
        return len(self.base)

    def load(self, index: int):
        return self.base.load(index)

    def choose(self, index: int) -> tuple[int, Optional[tuple[int, int]], Optional[int]]:
        """``(image index, centroid ``(y, x)`` to crop around or None, chosen class or None)`` for sample ``index``."""
        if self.fraction > 0 and float(torch.rand(())) < self.fraction:
            c = self.centroid_classes[int(torch.randint(len(self.centroid_classes), ()))]
            rows = self.centroids[c]
            i, y, x = (int(v) for v in rows[int(torch.randint(len(rows), ()))])
            return i, (y, x), c
        return index, None, None

    def __getitem__(self, index: int) -> Sample:
        source, center, _ = self.choose(index)
        image, mask, name = self.base.load(source)
        # unlabeled: the crop's padding map, as UniMatch's ignore mask (255 outside the image, else 0)
        key, fill = ("mask", self.ignore_index) if self.labeled else ("ignore", 255)
        if not self.labeled:
            mask = torch.zeros(image.shape[-2:], dtype=torch.uint8)
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * float(torch.rand(()))
        image, mask = scale_crop(image, mask, self.crop_size, scale, center=center, ignore_index=fill)
        if self.hflip and float(torch.rand(())) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        sample: Sample = {"image": image.contiguous(), "name": name}
        sample[key] = mask.contiguous().long() if self.labeled else mask.contiguous()
        return sample
