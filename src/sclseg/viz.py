"""Colour label maps, overlays, side-by-side comparison figures and learning curves; writing PNGs:
label maps as index PNGs with a palette, as colour images, and Cityscapes benchmark files.

Every PNG the package writes goes through :func:`save_png`, which writes a temporary file beside
the target and renames it: an interrupted command leaves whole files or none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from sclseg.data.base import ClassInfo, palette_array

__all__ = ["colorize", "overlay", "comparison_grid", "learning_curves", "save_png", "write_cityscapes_prediction",
           "write_color_png", "write_index_png"]


def save_png(image: Union[np.ndarray, Image.Image], path: Union[str, Path], *,
             palette: Optional[np.ndarray] = None) -> Path:
    """Write ``image`` to ``path`` as a PNG, atomically; returns ``path``.

    ``image``: ``(H, W)`` uint8 (a single-channel index PNG; with a ``(256, 3)`` ``palette``, mode
    P, shown in colour by viewers), ``(H, W, 3)`` uint8 RGB, or a PIL image.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    if palette is not None:
        img.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1)[: 256 * 3].tolist())  # L -> P
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``(H, W)`` class indices -> ``(H, W, 3)`` uint8 colours from a ``(256, 3)`` palette."""
    return palette[np.asarray(labels, dtype=np.int64) % 256]


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an ``(H, W, 3)`` uint8 image with its colourised labels."""
    colours = colorize(labels, palette).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).round().astype(np.uint8)


def comparison_grid(
    rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str], path: Path, *, scale: int = 3, gap: int = 4
) -> None:
    """Save a grid PNG: one row per example, one column per title (all tiles ``(H, W, 3)`` uint8)."""
    h, w = rows[0][0].shape[:2]
    th, tw = h * scale, w * scale
    header = 16
    canvas = Image.new("RGB", (len(titles) * (tw + gap) + gap, header + len(rows) * (th + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((gap + c * (tw + gap), 2), title, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            img = Image.fromarray(tile).resize((tw, th), Image.NEAREST)
            canvas.paste(img, (gap + c * (tw + gap), header + gap + r * (th + gap)))
    save_png(canvas, path)


def learning_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]], path: Path, *, ylabel: str, title: str,
    size: tuple[float, float] = (6.4, 4.0), dpi: int = 100,
) -> None:
    """Save a line plot PNG of ``size`` inches at ``dpi``: one line per name with a shaded band.

    ``curves[name]`` holds equal-length ``"step"``, ``"mean"``, ``"min"`` and ``"max"`` lists
    (the band spans min to max) and optionally ``"n"``, the runs behind each point, which the
    legend states. Drawn with matplotlib's Agg canvas, without pyplot's global state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, curve in curves.items():
        label = f"{name} ({max(curve['n'])} runs)" if curve.get("n") else name
        (line,) = axes.plot(curve["step"], curve["mean"], label=label, marker="." if len(curve["step"]) < 30 else None)
        axes.fill_between(curve["step"], curve["min"], curve["max"], color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if curves:
        axes.legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def write_index_png(labels: Union[np.ndarray, torch.Tensor], path: Union[str, Path],
                    palette: Optional[np.ndarray] = None) -> Path:
    """Save ``(H, W)`` class indices (0..255) as a single-channel PNG, with a palette when given."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 2 or (labels.size and (labels.min() < 0 or labels.max() > 255)):
        raise ValueError(f"labels must be a 2-D array of values 0..255, got shape {labels.shape}")
    return save_png(labels.astype(np.uint8), path, palette=palette)


def write_color_png(labels: Union[np.ndarray, torch.Tensor], path: Union[str, Path], classes: Sequence[ClassInfo],
                    ignore_index: int = 255) -> Path:
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
    out_dir: Union[str, Path],
    *,
    color_dir: Optional[Union[str, Path]] = None,
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
