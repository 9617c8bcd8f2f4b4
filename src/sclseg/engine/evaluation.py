"""Evaluation: a model on a dataset split, the scores during training, and prediction PNGs on disk.

* :func:`evaluate_model`: confusion matrix -> mIoU, per-class IoU, accuracy. Beside the
  whole-image numbers, ``boundary_miou`` is the mIoU of the pixels within ``eval.boundary_width``
  pixels of a label edge (see :func:`sclseg.metrics.boundary_band`), from a second confusion
  matrix over those pixels only: where a method's inter-pixel structure (object outlines, thin
  and small regions) shows, and the interior does not dilute it.
* :class:`Evaluator`: teacher and student on the eval split during training, and the best score.
* :func:`score_prediction_dir` compares a folder of label PNGs with a dataset split's ground
truth and returns the same dict as :func:`evaluate_model`, with
``eval_mode: "files"``.

Which file belongs to which image: for a sample named ``NAME`` (the image stem; for
Cityscapes ``CITY_SEQ_FRAME``, without ``_leftImg8bit``), the folder is searched recursively
for ``NAME.png``, else for the one ``NAME_*.png`` that is not a visualisation
(``*_color.png``, ``*_overlay.png``). That is the official Cityscapes rule
(``CITY_SEQ_FRAME*.png``), and it finds ``sclseg predict``'s ``NAME_labels.png``.

What the pixel values mean:

- Cityscapes: labelIds (0..33, as submitted to the benchmark server) by default; files whose
  name contains ``trainIds`` / ``TrainIds`` are read as train ids (0..18). ``ids`` forces one.
- Other datasets: class indices ``0..C-1``.

Predicted values that are no class (a Cityscapes labelId that is ignored in evaluation, or a
class index >= C, e.g. 255) count as wrong for the pixel's true class and as a false positive
for no class, exactly as the official Cityscapes evaluator counts them. Pixels whose label is
the ignore value are skipped. Predictions must have the label's size (full resolution).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sclseg.config import ConfigError, EvalConfig
from sclseg.data.base import SegmentationDataset
from sclseg.engine import distributed as dist
from sclseg.engine.inference import predict_probs, window_mode_name
from sclseg.metrics import ConfusionMatrix, boundary_band

__all__ = ["Evaluator", "eval_mode_name", "evaluate_model", "find_predictions", "read_prediction",
           "score_prediction_dir"]

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


PathLike = Union[str, Path]
IdFormat = Literal["auto", "label_ids", "train_ids"]
_VISUAL_SUFFIXES = ("_color", "_colour", "_overlay")


def _is_cityscapes(dataset: SegmentationDataset) -> bool:
    from sclseg.data.cityscapes import CityscapesDataset

    return isinstance(dataset, CityscapesDataset)


def find_predictions(pred_dir: PathLike, names: Sequence[str]) -> dict[str, Optional[Path]]:
    """``{sample name: prediction file or None}`` by the rule in the module docstring."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder not found: {pred_dir}")
    by_stem: dict[str, list[Path]] = {}
    for path in pred_dir.rglob("*.png"):
        by_stem.setdefault(path.stem, []).append(path)
    stems = sorted(by_stem)
    found: dict[str, Optional[Path]] = {}
    for name in names:
        if name in by_stem:
            candidates = by_stem[name]
        else:
            prefix = name + "_"
            candidates = []
            for stem in stems[bisect.bisect_left(stems, prefix) :]:
                if not stem.startswith(prefix):
                    break
                if not stem.endswith(_VISUAL_SUFFIXES):
                    candidates += by_stem[stem]
        if len(candidates) > 1:
            shown = ", ".join(str(p) for p in sorted(candidates)[:4])
            raise ValueError(f"several predictions for '{name}' in {pred_dir}: {shown}; keep one per image")
        found[name] = candidates[0] if candidates else None
    return found


def read_prediction(path: PathLike) -> np.ndarray:
    """A single-channel prediction PNG as an int64 ``(H, W)`` array."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if len(img.getbands()) != 1:
                raise ValueError(f"{path}: prediction has {len(img.getbands())} channels (mode {img.mode}); "
                                 "expected a single-channel PNG of label ids / class indices (not a colour image)")
            return np.asarray(img).astype(np.int64)
    except ValueError:
        raise
    except OSError as exc:
        raise ValueError(f"{path}: cannot read prediction ({exc})") from exc


def _ground_truth(dataset: SegmentationDataset, index: int) -> torch.Tensor:
    load_label = getattr(dataset, "load_label", None)
    if load_label is not None:
        return torch.as_tensor(load_label(index))
    _, label, _ = dataset.load(index)
    if label is None:
        raise ValueError(f"{type(dataset).__name__} item {index} has no label; cannot score predictions against it")
    return torch.as_tensor(label)


def _name(dataset: SegmentationDataset, index: int) -> str:
    items = getattr(dataset, "items", None)
    if items is not None and hasattr(items[index], "name"):
        return items[index].name  # Cityscapes: no image decode
    if items is not None and isinstance(items[index], tuple):
        return Path(items[index][0]).stem  # folder datasets
    return dataset.load(index)[2]


def _as_class_indices(pred: np.ndarray, path: Path, ids: Optional[IdFormat]) -> tuple[np.ndarray, str]:
    """A prediction ``(H, W)`` as class indices, and the format it was in; ``ids=None``: not Cityscapes."""
    if ids is None:
        return pred, "class_indices"
    fmt = ("train_ids" if "trainid" in path.stem.lower() else "label_ids") if ids == "auto" else ids
    if fmt == "label_ids":
        from sclseg.data.cityscapes import label_ids_to_train_ids

        pred = label_ids_to_train_ids(pred).astype(np.int64)
    return pred, fmt


def score_prediction_dir(
    dataset: SegmentationDataset,
    pred_dir: PathLike,
    *,
    ids: IdFormat = "auto",
    allow_missing: bool = False,
    max_images: Optional[int] = None,
) -> dict:
    """Score the prediction PNGs in ``pred_dir`` against ``dataset``'s labels.

    Returns ``{"miou", "pixel_accuracy", "per_class_iou": {name: IoU or None}, "eval_mode": "files",
    "images", "missing", "predictions", "prediction_ids"}`` (IoUs and accuracy in percent; classes
    absent from labels and predictions are None and left out of the mean). A missing prediction
    is a ``FileNotFoundError`` unless ``allow_missing`` (then it is skipped and counted).
    """
    cityscapes = _is_cityscapes(dataset)
    if not cityscapes and ids != "auto":
        raise ValueError(f"ids={ids!r} applies to Cityscapes only; other datasets' predictions are class indices")
    num_classes = dataset.num_classes
    indices = range(len(dataset) if max_images is None else min(max_images, len(dataset)))
    names = {i: _name(dataset, i) for i in indices}
    files = find_predictions(pred_dir, list(names.values()))
    # one extra column (index C) collects predictions that are no class: FN for the true class only
    confusion = ConfusionMatrix(num_classes + 1, dataset.ignore_index)
    scored, missing, formats = 0, [], set()
    for i in indices:
        name = names[i]
        path = files[name]
        if path is None:
            if allow_missing:
                missing.append(name)
                continue
            raise FileNotFoundError(f"no prediction for '{name}' in {pred_dir} (expected {name}.png or {name}_*.png)")
        pred, fmt = _as_class_indices(read_prediction(path), path, ids if cityscapes else None)
        formats.add(fmt)
        pred = np.where((pred >= 0) & (pred < num_classes), pred, num_classes)
        target = _ground_truth(dataset, i).long()
        if tuple(target.shape) != pred.shape:
            raise ValueError(f"{path}: prediction is {pred.shape[1]}x{pred.shape[0]} (WxH) but the label of '{name}' "
                             "is "
                             f"{target.shape[1]}x{target.shape[0]}; predictions must be at the label's full resolution")
        bad = (target != dataset.ignore_index) & ((target < 0) | (target >= num_classes))
        if bool(bad.any()):
            raise ValueError(f"label of '{name}' has values outside 0..{num_classes - 1} and the ignore value")
        confusion.update(torch.from_numpy(pred), target)
        scored += 1
    iou = confusion.iou()[:num_classes]
    present = ~torch.isnan(iou)
    return {
        "miou": float(iou[present].mean() * 100) if present.any() else float("nan"),
        "pixel_accuracy": confusion.pixel_accuracy(),
        "per_class_iou": {c.name: (None if torch.isnan(v) else float(v * 100)) for c, v in zip(dataset.classes, iou)},
        "eval_mode": "files",
        "images": scored,
        "missing": len(missing),
        "predictions": str(pred_dir),
        "prediction_ids": "+".join(sorted(formats)) if formats else None,
    }
