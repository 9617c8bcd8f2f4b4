"""Model evaluation on a dataset split: confusion matrix -> mIoU, per-class IoU, accuracy.

Beside the whole-image numbers, ``boundary_miou`` is the mIoU of the pixels within
``eval.boundary_width`` pixels of a label edge (see :func:`sclseg.metrics.boundary_band`),
from a second confusion matrix over those pixels only: where a method's inter-pixel
structure (object outlines, thin and small regions) shows, and the interior does not dilute it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sclseg.config import EvalConfig
from sclseg.data.base import SegmentationDataset
from sclseg.engine import distributed as dist
from sclseg.engine.inference import predict_probs, window_mode_name
from sclseg.metrics import ConfusionMatrix, boundary_band

__all__ = ["evaluate_model", "eval_mode_name"]


def eval_mode_name(cfg: EvalConfig) -> str:
    """How predictions were made, for every reported number: whole / sliding, scales, flip."""
    parts = [window_mode_name(cfg.protocol, cfg.tile)]
    if list(cfg.scales) != [1.0]:
        parts.append("ms" + "/".join(f"{s:g}" for s in cfg.scales))
    if cfg.flip:
        parts.append("flip")
    return "+".join(parts)


class _Shard(Dataset):
    def __init__(self, dataset: Dataset, rank: int, world: int) -> None:
        self.dataset, self.indices = dataset, list(range(rank, len(dataset), world))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[self.indices[i]]


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    dataset: SegmentationDataset,
    cfg: EvalConfig,
    *,
    device: torch.device,
    num_workers: int = 0,
    max_images: Optional[int] = None,
) -> dict:
    """Score ``model`` on ``dataset`` (labeled); ranks share the images and sum their matrices.

    Returns ``{"miou", "pixel_accuracy", "per_class_iou": {name: iou}, "eval_mode", "images"}``,
    IoUs in percent; with ``cfg.boundary_width > 0`` also ``"boundary_miou"``,
    ``"boundary_per_class_iou"``, ``"boundary_width"`` and ``"boundary_pixels"`` (the band's
    labelled pixel count), the same measures over the band of pixels near a label edge.
    """
    was_training = model.training
    model.eval()
    rank, world = dist.rank(), dist.world_size()
    data: Dataset = dataset
    if max_images is not None:
        data = torch.utils.data.Subset(dataset, range(min(max_images, len(dataset))))
    shard = _Shard(data, rank, world)
    loader = DataLoader(shard, batch_size=cfg.batch_size, num_workers=num_workers)
    confusion = ConfusionMatrix(dataset.num_classes, dataset.ignore_index, device=device)
    band = ConfusionMatrix(dataset.num_classes, dataset.ignore_index, device=device)
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        probs = predict_probs(model, images, scales=cfg.scales, flip=cfg.flip, tile=cfg.tile, overlap=cfg.tile_overlap,
                              protocol=cfg.protocol)
        pred, target = probs.argmax(dim=1), batch["mask"].to(device)
        confusion.update(pred, target)
        if cfg.boundary_width:
            near_edge = boundary_band(target, cfg.boundary_width, dataset.ignore_index)
            band.update(pred[near_edge], target[near_edge])
    dist.all_reduce_sum(confusion.matrix)
    dist.all_reduce_sum(band.matrix)
    model.train(was_training)
    names = [c.name for c in dataset.classes]
    result = confusion.summary(names)
    if cfg.boundary_width:
        near = band.summary(names)
        result |= {"boundary_miou": near["miou"], "boundary_per_class_iou": near["per_class_iou"],
                   "boundary_width": cfg.boundary_width, "boundary_pixels": int(band.matrix.sum())}
    result["eval_mode"] = eval_mode_name(cfg)
    result["images"] = len(data)
    return result
