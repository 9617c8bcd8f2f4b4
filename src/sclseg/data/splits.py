"""Semi-supervised splits: UniMatch/CPS-style list files, and seeded fractions of a pool.

List files (the format the community's Cityscapes splits circulate in)::

    splits/<dataset>/<split>/labeled.txt     # one "image_path label_path" per line
    splits/<dataset>/<split>/unlabeled.txt   # one "image_path [label_path]" per line

Paths are relative to the dataset root (absolute paths are taken as they are). A line may hold
the image path alone; blank lines and lines starting with ``#`` are skipped. Label paths in
``unlabeled.txt`` are accepted and ignored: unlabeled images never need label files.

Fraction splits take a seeded permutation of the (sorted) pool: the first ``k`` items are
labeled, the rest held back. With one seed, smaller splits are subsets of larger ones (1/8 of
the pool lies inside 1/4 of it), and the result never depends on file-system order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

__all__ = ["SplitEntry", "SplitLists", "read_split_file", "read_split_dir", "fraction_split", "resolve_in_root"]

PathLike = Union[str, Path]


@dataclass(frozen=True)
class SplitEntry:
    """One line of a split file: an image path and, optionally, a label path (as written)."""

    image: str
    label: Optional[str] = None


@dataclass
class SplitLists:
    """The lists of one split folder; ``unlabeled`` is None when there is no ``unlabeled.txt``."""

    labeled: list[SplitEntry]
    unlabeled: Optional[list[SplitEntry]]
    labeled_file: Path
    unlabeled_file: Optional[Path]


def read_split_file(path: PathLike, *, allow_empty: bool = False) -> list[SplitEntry]:
    """Parse a list file: ``image_path [label_path]`` per line (whitespace separated)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    entries: list[SplitEntry] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tokens = line.split()
        if len(tokens) > 2:
            raise ValueError(f"{path}:{lineno}: expected 'image_path [label_path]', got {len(tokens)} fields: {line!r}")
        image = tokens[0]
        if image in seen:
            raise ValueError(f"{path}:{lineno}: image {image!r} is listed twice (first on line {seen[image]})")
        seen[image] = lineno
        entries.append(SplitEntry(image, tokens[1] if len(tokens) == 2 else None))
    if not entries and not allow_empty:
        raise ValueError(f"{path}: no entries (expected one 'image_path label_path' per line)")
    return entries


def read_split_dir(path: PathLike) -> SplitLists:
    """Read ``labeled.txt`` (required) and ``unlabeled.txt`` (optional) of a split folder.

    ``path`` may also be the ``labeled.txt`` file itself. An image listed in both files is an error.
    """
    path = Path(path)
    if path.is_dir():
        labeled_file = path / "labeled.txt"
        if not labeled_file.is_file():
            raise FileNotFoundError(f"{path}: no labeled.txt (expected splits/<dataset>/<split>/labeled.txt)")
    elif path.is_file():
        labeled_file = path
    else:
        raise FileNotFoundError(
            f"split folder or file not found: {path} (expected a folder with labeled.txt [+ unlabeled.txt], "
            "or a labeled.txt file)"
        )
    labeled = read_split_file(labeled_file)
    unlabeled_file: Optional[Path] = labeled_file.parent / "unlabeled.txt"
    unlabeled = None
    if unlabeled_file.is_file() and unlabeled_file != labeled_file:
        unlabeled = read_split_file(unlabeled_file, allow_empty=True)
        both = {e.image for e in labeled} & {e.image for e in unlabeled}
        if both:
            example = sorted(both)[0]
            raise ValueError(f"{unlabeled_file}: {len(both)} image(s) also in {labeled_file.name}, e.g. {example}")
    else:
        unlabeled_file = None
    return SplitLists(labeled, unlabeled, labeled_file, unlabeled_file)


def resolve_in_root(root: Path, relative: str) -> Path:
    """``relative`` under ``root`` (absolute paths stay as they are)."""
    path = Path(relative)
    return path if path.is_absolute() else root / path


def fraction_split(
    n: int, *, fraction: Optional[float] = None, count: Optional[int] = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into sorted ``(labeled, held_back)`` index arrays.

    Give exactly one of ``fraction`` (0 < f <= 1; ``round(f * n)`` items, at least 1) or ``count``.
    The labeled items are the first ``k`` of ``default_rng(seed).permutation(n)``, so splits of one
    seed are nested and the two parts are disjoint and cover the pool.
    """
    if (fraction is None) == (count is None):
        raise ValueError("give exactly one of fraction or count")
    if n < 1:
        raise ValueError("cannot split an empty pool")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"labeled fraction must be in (0, 1], got {fraction}")
        k = max(1, int(round(fraction * n)))
    else:
        assert count is not None
        if not 1 <= count <= n:
            raise ValueError(f"labeled count must be in [1, {n}] (the pool size), got {count}")
        k = count
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:k]), np.sort(order[k:])
