"""Datasets and the builder that turns a :class:`~sclseg.config.DataConfig` into splits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from sclseg.config import Config, ConfigError
from sclseg.data.base import ClassInfo, SegmentationDataset, palette_array
from sclseg.data.digits import DIGIT_CLASSES, DigitScenes, make_digit_scenes
from sclseg.data.transforms import TrainTransform

__all__ = [
    "ClassInfo",
    "DataBundle",
    "SegmentationDataset",
    "build_data",
    "palette_array",
    "training_view",
]


@dataclass
class DataBundle:
    """The splits of one run. ``unlabeled`` is None when the data has no unlabeled images."""

    labeled: SegmentationDataset
    unlabeled: Optional[SegmentationDataset]
    eval_splits: dict[str, SegmentationDataset]
    classes: list[ClassInfo]
    ignore_index: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _digits(cfg: Config) -> DataBundle:
    d = cfg.data.digits
    scenes = make_digit_scenes(
        {"train": d.n_train, "val": d.n_val, "test": d.n_test},
        image_size=d.image_size,
        min_digits=d.min_digits,
        max_digits=d.max_digits,
        digit_scale=(d.digit_scale[0], d.digit_scale[1]),
        seed=d.seed,
    )
    if not 1 <= d.n_labeled <= d.n_train:
        raise ConfigError(f"data.digits.n_labeled must be in [1, n_train={d.n_train}], got {d.n_labeled}")
    order = np.random.default_rng([d.seed, 1]).permutation(d.n_train)
    transform = TrainTransform(
        cfg.data.crop_size,
        base_size=d.image_size,
        scale_range=cfg.data.scale_range,
        hflip=cfg.data.hflip,
        color_jitter=cfg.data.color_jitter,
        blur_prob=cfg.data.blur_prob,
        ignore_index=cfg.data.ignore_index,
    )
    train_images, train_masks = scenes.images["train"], scenes.masks["train"]
    labeled = DigitScenes(train_images, train_masks, order[: d.n_labeled], transform=transform)
    unlabeled = DigitScenes(train_images, train_masks, order[d.n_labeled :], labeled=False, transform=transform)
    evals = {s: DigitScenes(scenes.images[s], scenes.masks[s], split=s) for s in ("val", "test")}
    return DataBundle(labeled, unlabeled if len(unlabeled) else None, evals, DIGIT_CLASSES, DigitScenes.ignore_index)


def training_view(cfg: Config, dataset: SegmentationDataset, *, class_uniform: bool = True) -> SegmentationDataset:
    """Training samples of a file-backed dataset: random scale relative to each image, crop with
    ignore padding (class-uniform for ``data.class_uniform.fraction`` of labeled crops when
    enabled and ``class_uniform``), then the standard :class:`TrainTransform`'s flip, colour
    jitter and blur.
    """
    from pathlib import Path

    from sclseg.data.class_uniform import TrainingView, class_centroids, make_tail_transform

    d, cu = cfg.data, cfg.data.class_uniform
    centroids = None
    use_cu = cu.enabled and class_uniform and dataset.labeled
    if use_cu:
        if not 0.0 <= cu.fraction <= 1.0:
            raise ConfigError(f"data.class_uniform.fraction must be in [0, 1], got {cu.fraction}")
        if cu.tile_size < 1:
            raise ConfigError(f"data.class_uniform.tile_size must be >= 1, got {cu.tile_size}")
        cache_dir = Path(cu.cache_dir).expanduser() if cu.cache_dir else Path(d.root).expanduser() / ".sclseg_cache"
        centroids = class_centroids(dataset, tile_size=cu.tile_size, cache_dir=cache_dir, num_workers=d.num_workers)
    tail = make_tail_transform(d.crop_size, hflip=d.hflip, color_jitter=d.color_jitter, blur_prob=d.blur_prob,
                               ignore_index=d.ignore_index)
    try:
        return TrainingView(dataset, crop_size=d.crop_size, scale_range=d.scale_range, tail=tail, centroids=centroids,
                            fraction=cu.fraction if use_cu else 0.0)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None


def build_data(cfg: Config, *, for_training: bool = True) -> DataBundle:
    """Datasets for ``cfg.data.name``: digits (embedded), cityscapes, folder (your own data).

    ``for_training=False`` (evaluation, scoring files) skips the class-uniform centroid scan of
    the labeled set; the evaluation splits are the same either way.
    """
    if cfg.data.name == "digits":
        return _digits(cfg)
    if cfg.data.name == "cityscapes":
        from sclseg.data.cityscapes import build_cityscapes

        return build_cityscapes(cfg, for_training=for_training)
    if cfg.data.name == "folder":
        from sclseg.data.folder import build_folder

        return build_folder(cfg, for_training=for_training)
    raise ConfigError(f"data.name '{cfg.data.name}' is not available; use 'digits', 'cityscapes' or 'folder'")
