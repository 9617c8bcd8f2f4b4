"""Model evaluation on a dataset split: confusion matrix -> mIoU, per-class IoU, accuracy."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sclseg.config import EvalConfig
from sclseg.data.base import SegmentationDataset
from sclseg.engine import distributed as dist
from sclseg.engine.inference import predict_probs
from sclseg.metrics import ConfusionMatrix

__all__ = ["evaluate_model", "eval_mode_name"]


def eval_mode_name(cfg: EvalConfig) -> str:
    """How predictions were made, for every reported number: whole / sliding, scales, flip."""
    parts = ["sliding" if cfg.tile else "whole"]
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
    IoUs in percent.
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
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        probs = predict_probs(model, images, scales=cfg.scales, flip=cfg.flip, tile=cfg.tile, overlap=cfg.tile_overlap)
        confusion.update(probs.argmax(dim=1), batch["mask"].to(device))
    dist.all_reduce_sum(confusion.matrix)
    model.train(was_training)
    result = confusion.summary([c.name for c in dataset.classes])
    result["eval_mode"] = eval_mode_name(cfg)
    result["images"] = len(data)
    return result
