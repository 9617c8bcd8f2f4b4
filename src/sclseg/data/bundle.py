"""What the data builder returns (:class:`DataBundle`), and the training view of file-backed datasets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sclseg.config import Config, ConfigError
from sclseg.data.base import ClassInfo, SegmentationDataset
from sclseg.data.class_uniform import TrainingView, class_centroids

__all__ = ["DataBundle", "training_view"]


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


def training_view(cfg: Config, dataset: SegmentationDataset, *, class_uniform: bool = True) -> SegmentationDataset:
    """Training samples of ``dataset``: random scale relative to each image, crop with
    ignore padding (class-uniform for ``data.class_uniform.fraction`` of labeled crops when
    enabled and ``class_uniform``), then the flip of ``data.hflip``. Colour jitter and blur are
    applied to whole batches by the trainer (:func:`sclseg.data.transforms.build_photometric`).
    """
    d, cu = cfg.data, cfg.data.class_uniform
    centroids = None
    use_cu = cu.enabled and class_uniform and dataset.labeled
    if use_cu:
        cache_dir = Path(cu.cache_dir).expanduser() if cu.cache_dir else Path(d.root).expanduser() / ".sclseg_cache"
        centroids = class_centroids(dataset, tile_size=cu.tile_size, cache_dir=cache_dir, num_workers=d.num_workers)
    try:
        return TrainingView(dataset, crop_size=d.crop_size, scale_range=d.scale_range, hflip=d.hflip,
                            centroids=centroids,
                            fraction=cu.fraction if use_cu else 0.0)
    except ValueError as exc:
        raise ConfigError(f"data: {exc}") from None
