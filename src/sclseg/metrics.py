"""Confusion-matrix segmentation metrics: mIoU, per-class IoU, pixel accuracy."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["ConfusionMatrix"]


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
