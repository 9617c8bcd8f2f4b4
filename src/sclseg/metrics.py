"""Confusion-matrix segmentation metrics: mIoU, per-class IoU, pixel accuracy, boundary band."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ConfusionMatrix", "boundary_band"]


def boundary_band(target: Tensor, width: int, ignore_index: int = 255) -> Tensor:
    """Pixels within ``width`` pixels of a label edge (the "trimap" band), ``(B, H, W)`` bool.

    ``target``: ``(B, H, W)`` integer labels. A pixel is in the band when it is labelled
    (not ``ignore_index``) and some labelled pixel of a different class lies within Chebyshev
    distance ``width`` of it, i.e. in the ``(2 * width + 1)`` square window centred on it,
    clipped at the image border. Both sides of every edge are in the band; ``width=1`` keeps
    the pixels 8-adjacent to another class. Ignore pixels are never in the band and never make
    an edge: a class that meets only an ignore region has no band there. Computed with a
    max-pool and a min-pool of the label map, each split into a row and a column pass (the
    maximum over a square is the maximum of its row maxima).
    """
    if width < 1:
        raise ValueError(f"boundary width must be >= 1 pixel, got {width}")
    valid = target != ignore_index
    labels = target.to(torch.float32).unsqueeze(1)
    size = 2 * width + 1
    hidden = ~valid.unsqueeze(1)  # ignore pixels take -inf in both pools, so they never win either
    both = torch.cat([labels.masked_fill(hidden, -math.inf), (-labels).masked_fill(hidden, -math.inf)], dim=1)
    both = F.max_pool2d(both, (1, size), stride=1, padding=(0, width))  # border padding is -inf too
    highest, negated_lowest = F.max_pool2d(both, (size, 1), stride=1, padding=(width, 0)).unbind(1)
    labels = labels.squeeze(1)
    return valid & ((highest != labels) | (-negated_lowest != labels))


class ConfusionMatrix:
    """Accumulates ``matrix[true, pred]`` pixel counts over batches (int64, on ``device``)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: Optional[torch.device | str] = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add predictions and labels of the same shape; ignore-labelled pixels are skipped.

        Labels outside ``[0, num_classes)`` that are not the ignore value are an error.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have one shape")
        valid = target != self.ignore_index
        t = target[valid].long()
        p = pred[valid].long().to(t.device)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
            raise ValueError(
                f"label values must be in [0, {self.num_classes}) or the ignore value {self.ignore_index}, "
                f"found {int(t.min())}..{int(t.max())}"
            )
        p = p.clamp(0, self.num_classes - 1)
        counts = torch.bincount(t * self.num_classes + p, minlength=self.num_classes**2)
        self.matrix += counts.view(self.num_classes, self.num_classes).to(self.matrix.device)

    def iou(self) -> Tensor:
        """Per-class IoU (float64); NaN for classes absent from both labels and predictions."""
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        """Mean IoU in percent over classes present in labels or predictions."""
        iou = self.iou()
        present = ~torch.isnan(iou)
        return float(iou[present].mean() * 100) if present.any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(self.matrix.diag().sum().double() / total * 100) if total > 0 else float("nan")

    def summary(self, class_names: Sequence[str]) -> dict:
        """``{"miou", "pixel_accuracy", "per_class_iou": {name: IoU 0-100 or None}}``."""
        iou = self.iou()
        return {
            "miou": self.miou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "per_class_iou": {
                name: (None if torch.isnan(v) else float(v * 100)) for name, v in zip(class_names, iou)
            },
        }
