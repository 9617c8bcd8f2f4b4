"""Colour label maps, overlays, side-by-side comparison figures and learning curves; writing PNGs.

Every PNG the package writes goes through :func:`save_png`, which writes a temporary file beside
the target and renames it: an interrupted command leaves whole files or none.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["colorize", "overlay", "comparison_grid", "learning_curves", "save_png"]


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
