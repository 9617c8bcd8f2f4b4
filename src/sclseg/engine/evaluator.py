"""Evaluation during training: teacher and student on the eval split, and the best score so far."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from sclseg.config import ConfigError, EvalConfig
from sclseg.data.base import SegmentationDataset
from sclseg.engine.evaluate import evaluate_model

__all__ = ["Evaluator"]


class Evaluator:
    """Scores the teacher and the student on ``splits[cfg.split]`` and tracks the best score.

    The score that counts (``record["miou"]``) is the teacher's when ``cfg.use_teacher``, else the
    student's. Evaluating never changes the training: the RNG states are forked around it.

    Data without any evaluation split (a folder dataset with ``val_fraction: 0`` and no ``val/``)
    trains without evaluation: ``dataset`` is None and the loop does not call :meth:`evaluate`.

    Args:
        max_images: score only the first images of the split (the dry run uses 1).
    """

    def __init__(self, cfg: EvalConfig, splits: dict[str, SegmentationDataset], device: torch.device, *,
                 max_images: Optional[int] = None) -> None:
        if splits and cfg.split not in splits:
            raise ConfigError(f"eval.split: '{cfg.split}' is not a split of this data; have {sorted(splits)}")
        self.cfg, self.dataset, self.device, self.max_images = cfg, splits.get(cfg.split), device, max_images
        self.best: dict = {"miou": None, "iteration": None}

    def evaluate(self, teacher: nn.Module, student: nn.Module, iteration: int) -> dict:
        """The record of one evaluation (collective under DDP)."""
        record: dict = {"iteration": iteration, "split": self.cfg.split}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for role, model in (("teacher", teacher), ("student", student)):
                result = evaluate_model(model, self.dataset, self.cfg, device=self.device, max_images=self.max_images)
                record[f"{role}_miou"] = result["miou"]
                record[f"{role}_per_class_iou"] = result["per_class_iou"]
                if "boundary_miou" in result:
                    record[f"{role}_boundary_miou"] = result["boundary_miou"]
                record["eval_mode"] = result["eval_mode"]
        record["miou"] = record["teacher_miou" if self.cfg.use_teacher else "student_miou"]
        return record

    def improves(self, record: dict) -> bool:
        """Whether ``record`` beats the best so far; if so it becomes the best."""
        if self.best["miou"] is not None and record["miou"] <= self.best["miou"]:
            return False
        self.best = {"miou": record["miou"], "iteration": record["iteration"]}
        return True

    def recall(self, best: dict, records: list[dict], up_to: int) -> None:
        """Take the best of a resumed run: the checkpoint's, or a later evaluation of the same step
        recorded in ``metrics.jsonl`` (a checkpoint is written before its step is evaluated)."""
        self.best = dict(best)
        for record in records:
            if record["iteration"] <= up_to and record.get("miou") is not None:
                self.improves({"miou": record["miou"], "iteration": record["iteration"]})
