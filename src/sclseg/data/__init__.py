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


def build_data(cfg: Config) -> DataBundle:
    """Datasets for ``cfg.data.name``."""
    if cfg.data.name == "digits":
        return _digits(cfg)
    raise ConfigError(f"data.name '{cfg.data.name}' is not available in this version; use 'digits'")
