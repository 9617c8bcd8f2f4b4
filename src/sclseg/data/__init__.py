"""Datasets and the builder that turns a :class:`~sclseg.config.DataConfig` into splits."""

from __future__ import annotations

import numpy as np

from sclseg.config import Config
from sclseg.data.base import ClassInfo, SegmentationDataset, palette_array
from sclseg.data.bundle import DataBundle, training_view
from sclseg.data.digits import DIGIT_CLASSES, DigitScenes, make_digit_scenes

__all__ = [
    "ClassInfo",
    "DataBundle",
    "SegmentationDataset",
    "build_data",
    "palette_array",
    "training_view",
]


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
    order = np.random.default_rng([d.seed, 1]).permutation(d.n_train)
    train_images, train_masks = scenes.images["train"], scenes.masks["train"]
    labeled = training_view(cfg, DigitScenes(train_images, train_masks, order[: d.n_labeled]), class_uniform=False)
    unlabeled = training_view(cfg, DigitScenes(train_images, train_masks, order[d.n_labeled :], labeled=False),
                              class_uniform=False)
    evals = {s: DigitScenes(scenes.images[s], scenes.masks[s], split=s) for s in ("val", "test")}
    return DataBundle(labeled, unlabeled if len(unlabeled) else None, evals, DIGIT_CLASSES, DigitScenes.ignore_index)


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
    raise AssertionError(f"data.name {cfg.data.name!r} passed config validation")
