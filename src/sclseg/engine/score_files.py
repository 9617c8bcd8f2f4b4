"""Score prediction PNGs already on disk, and write predictions as files.

:func:`score_prediction_dir` compares a folder of label PNGs with a dataset split's ground
truth and returns the same dict as :func:`sclseg.engine.evaluate.evaluate_model`, with
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
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from sclseg.data.base import ClassInfo, SegmentationDataset, palette_array
from sclseg.viz import colorize, save_png
from sclseg.metrics import ConfusionMatrix

__all__ = [
    "find_predictions",
    "read_prediction",
    "score_prediction_dir",
    "write_cityscapes_prediction",
    "write_color_png",
    "write_index_png",
]

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
            raise ValueError(f"{path}: prediction is {pred.shape[1]}x{pred.shape[0]} (WxH) but the label of '{name}' is "
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


def write_index_png(labels: Union[np.ndarray, torch.Tensor], path: PathLike, palette: Optional[np.ndarray] = None) -> Path:
    """Save ``(H, W)`` class indices (0..255) as a single-channel PNG, with a palette when given."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2 or (labels.size and (labels.min() < 0 or labels.max() > 255)):
        raise ValueError(f"labels must be a 2-D array of values 0..255, got shape {labels.shape}")
    return save_png(labels.astype(np.uint8), path, palette=palette)


def write_color_png(labels: Union[np.ndarray, torch.Tensor], path: PathLike, classes: Sequence[ClassInfo], ignore_index: int = 255) -> Path:
    """Save ``(H, W)`` class indices as an RGB colour image (class colours, black for ignore/other)."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return save_png(colorize(labels, palette_array(classes, ignore_index)), path)


def _resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(labels.astype(np.int64))[None, None].float()
    return torch.nn.functional.interpolate(t, size=size, mode="nearest-exact")[0, 0].long().numpy()


def write_cityscapes_prediction(
    train_ids: Union[np.ndarray, torch.Tensor],
    name: str,
    out_dir: PathLike,
    *,
    color_dir: Optional[PathLike] = None,
    size: Optional[tuple[int, int]] = (1024, 2048),
) -> dict[str, Path]:
    """Write one Cityscapes prediction for the benchmark server (and the official evaluator).

    ``train_ids``: ``(H, W)`` train ids 0..18 (255 or other values become labelId 0, 'unlabeled').
    Written: ``out_dir/CITY_SEQ_FRAME_labelIds.png`` (uint8 labelIds; ``name`` may be an image
    name such as ``CITY_SEQ_FRAME_leftImg8bit``), and with ``color_dir``,
    ``color_dir/CITY_SEQ_FRAME_color.png`` in the official colours. Keep ``color_dir`` apart
    from ``out_dir``: the server and the evaluator want one PNG per image in the folder. Labels
    of another size than ``size`` (H, W; default the full 1024x2048) are resized with nearest
    neighbour; predict at full resolution where you can. ``size=None`` keeps the input size.
    Returns ``{"label_ids": path, "color": path}`` (``color`` only with ``color_dir``).
    """
    from sclseg.data.cityscapes import cityscapes_classes, cityscapes_stem, train_ids_to_label_ids

    if isinstance(train_ids, torch.Tensor):
        train_ids = train_ids.detach().cpu().numpy()
    train_ids = np.asarray(train_ids)
    if train_ids.ndim != 2:
        raise ValueError(f"train_ids must be (H, W), got shape {train_ids.shape}")
    if size is not None and tuple(train_ids.shape) != tuple(size):
        train_ids = _resize_nearest(train_ids, (int(size[0]), int(size[1])))
    stem = cityscapes_stem(name)
    written = {"label_ids": write_index_png(train_ids_to_label_ids(train_ids), Path(out_dir) / f"{stem}_labelIds.png")}
    if color_dir is not None:
        written["color"] = write_color_png(train_ids, Path(color_dir) / f"{stem}_color.png", cityscapes_classes())
    return written
