"""The full data check: every image and mask of every split a config uses, read in parallel.

:func:`check_data` builds the config's data (digits, folder or cityscapes), then decodes every
image (a truncated or corrupt file fails the full decode, not the header) and every mask of
the labeled, unlabeled and evaluation splits, and collects every problem instead of stopping
at the first one:

- an image or mask that cannot be read, or is truncated;
- a mask that is not single-channel (an RGB colour mask), or not the size of its image;
- mask values that are neither class indices nor the ignore value (Cityscapes ``labelIds``:
  ids outside the official table);
- an image of a labeled split without its mask (folder layout: also a mask without an image);
- a class that never occurs in the labeled masks while the ignore value covers a large share
  of them: the binary 0/255 trap, where the object pixels of a two-class folder dataset
  carry 255, the ignore value, and the object class is never trained.

Results are cached per file pair (keyed by path, size and modification time) in
``data_check.json`` in the dataset's cache folder (``data.class_uniform.cache_dir``, default
``<data.root>/.sclseg_cache``, where the class-uniform centroids are cached too), so a second
check reads only the files that changed.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from PIL import Image

from sclseg.config import Config, ConfigError
from sclseg.data.bundle import DataBundle
from sclseg.data.folder import displayed_size

__all__ = ["DataCheckReport", "Problem", "check_data", "check_cache_path"]

MaskFormat = Literal["index", "labelIds", "trainIds"]
_MASK_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L", "1")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_LOSSY_FORMATS = ("JPEG", "MPO", "WEBP")  # WEBP also stores lossless; sclseg's masks are PNG either way
_CACHE_NAME = "data_check.json"
_CACHE_VERSION = 2
_TRAP_IGNORE_SHARE = 0.05  # a class absent while the ignore value covers >= this share: the 0/255 trap
_LISTED = 20  # problems listed in the ConfigError of DataCheckReport.raise_for_problems
_LABELED = "train"  # the split whose masks train the model (the class coverage is counted on it)


@dataclass(frozen=True)
class Problem:
    """One bad file (or file pair): what is wrong and what was expected."""

    file: str
    what: str
    expected: str
    split: str = ""

    def line(self) -> str:
        where = f" [{self.split}]" if self.split else ""
        return f"{self.file}{where}: {self.what}; expected {self.expected}"


@dataclass(frozen=True)
class _Item:
    """One sample of a split: image file, mask file (None for unlabeled) and how to read the mask."""

    split: str
    image: Path
    mask: Optional[Path]
    mask_format: MaskFormat
    num_classes: int
    ignore_value: int  # the raw mask value of unlabelled pixels (index masks)

    def key(self) -> str:
        return json.dumps([self.split, str(self.image.absolute()),
                           None if self.mask is None else str(self.mask.absolute()),
                           self.mask_format, self.num_classes, self.ignore_value])

    def signature(self) -> list[Optional[int]]:
        """Size and mtime (ns) of the image and the mask; None for a missing file."""
        out: list[Optional[int]] = []
        for path in (self.image, self.mask):
            try:
                st = path.stat() if path is not None else None
            except OSError:
                st = None
            out += [None, None] if st is None else [st.st_size, st.st_mtime_ns]
        return out


@dataclass
class _Result:
    """What one item's check found: its problems and the class histogram of its mask.

    ``hist``: ``num_classes + 1`` pixel counts, the last one the ignored pixels (None: unlabeled
    or unreadable). ``read``: files decoded (0 when taken from the cache).
    """

    problems: list[Problem]
    hist: Optional[list[int]]
    read: int = 0


@dataclass
class DataCheckReport:
    """The outcome of :func:`check_data`.

    ``problems`` make the data unusable for the config; ``warnings`` do not (e.g. a class no
    labeled mask contains, with little ignored area). ``files`` counts the image and mask files
    covered, ``read`` those decoded in this run (the others were unchanged since a cached check).
    """

    problems: list[Problem]
    warnings: list[Problem]
    files: int
    read: int
    seconds: float
    splits: dict[str, int]
    class_pixels: dict[str, int]
    ignored_pixels: int
    workers: int
    cache: Optional[str]

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else float("inf")

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: what was checked, how fast, and how many problems and warnings."""
        splits = ", ".join(f"{n} {name}" for name, n in self.splits.items())
        files = (f"{self.files} files ({self.read} read, {self.files - self.read} unchanged since the cached check) "
                 f"at {self.files_per_s:.0f} files/s with {self.workers} threads" if self.files else "held in memory")
        return (f"checked {sum(self.splits.values())} samples ({splits}) in {self.seconds:.1f} s, {files}: "
                f"{len(self.problems)} problem(s), {len(self.warnings)} warning(s)")

    def raise_for_problems(self) -> None:
        """Raise a :class:`ConfigError` listing the problems (the first 20, then a count)."""
        if not self.problems:
            return
        lines = [p.line() for p in self.problems[:_LISTED]]
        if len(self.problems) > _LISTED:
            lines.append(f"... and {len(self.problems) - _LISTED} more")
        raise ConfigError(f"data check: {len(self.problems)} problem(s):\n  " + "\n  ".join(lines))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "files": self.files,
            "read": self.read,
            "seconds": round(self.seconds, 3),
            "files_per_s": round(self.files_per_s, 1) if self.seconds > 0 else None,
            "workers": self.workers,
            "splits": self.splits,
            "class_pixels": self.class_pixels,
            "ignored_pixels": self.ignored_pixels,
            "cache": self.cache,
            "problems": [asdict(p) for p in self.problems],
            "warnings": [asdict(p) for p in self.warnings],
        }


def check_cache_path(cfg: Config) -> Optional[Path]:
    """Where the check's cache lives: the dataset's cache folder (None for the embedded digits)."""
    if cfg.data.name == "digits" or cfg.data.root is None:
        return None
    cache_dir = cfg.data.class_uniform.cache_dir
    base = Path(cache_dir).expanduser() if cache_dir else Path(cfg.data.root).expanduser() / ".sclseg_cache"
    return base / _CACHE_NAME


# ---------------------------------------------------------------------------------------------
# reading one item


def _read_image(path: Path, split: str) -> tuple[Optional[tuple[int, int, int, int]], list[Problem]]:
    """``((H, W, stored H, stored W), [])`` of a fully decoded image, or ``(None, [problem])``.

    ``H, W`` is the size as displayed (its EXIF orientation applied, as training reads it).
    """
    try:
        with Image.open(path) as img:
            img.load()
            return (*displayed_size(img), img.height, img.width), []
    except FileNotFoundError:
        return None, [Problem(str(path), "image file not found", "the file the split lists", split)]
    except _DECODE_ERRORS as exc:
        return None, [Problem(str(path), f"cannot read image ({exc})", "a readable, complete image file", split)]


@dataclass(frozen=True)
class _MaskValues:
    """A decoded mask: its ``(H, W)`` size and the pixel count of every value that occurs."""

    size: tuple[int, int]
    values: np.ndarray  # (K,) int64, ascending
    counts: np.ndarray  # (K,) int64


def _read_mask(path: Path, split: str) -> tuple[Optional[_MaskValues], list[Problem]]:
    """The size and value counts of a mask, or ``(None, [problem])``.

    8-bit masks (L, P) are counted by Pillow's histogram, in C without the GIL (a NumPy
    bincount of a 2048x1024 mask takes four times as long and holds the GIL).
    """
    try:
        with Image.open(path) as img:
            if img.mode not in _MASK_MODES:
                return None, [Problem(str(path), f"mask has mode {img.mode} ({len(img.getbands())} channels)",
                                      "a single-channel index PNG (mode L or P) whose pixel values are class indices",
                                      split)]
            if img.format in _LOSSY_FORMATS:
                return None, [Problem(str(path), f"mask holds {img.format} data (lossy compression changes class "
                                      "values along every edge)", "a lossless index PNG", split)]
            img.load()
            size = (img.height, img.width)
            if img.mode in ("L", "P"):
                counts = np.asarray(img.histogram(), dtype=np.int64)
                values = np.flatnonzero(counts)
                return _MaskValues(size, values, counts[values]), []
            values, counts = np.unique(np.asarray(img).astype(np.int64), return_counts=True)
    except FileNotFoundError:
        return None, [Problem(str(path), "mask file not found", "one mask per labeled image", split)]
    except _DECODE_ERRORS as exc:
        return None, [Problem(str(path), f"cannot read mask ({exc})", "a readable, complete index PNG", split)]
    return _MaskValues(size, values, counts), []


def _shown(values: np.ndarray) -> str:
    return ", ".join(str(int(v)) for v in values[:10]) + (" ..." if len(values) > 10 else "")


def _class_histogram(item: _Item, mask: _MaskValues) -> tuple[Optional[np.ndarray], list[Problem]]:
    """``(num_classes + 1,)`` pixel counts per class, the last one ignored pixels; or the value problem."""
    values, counts = mask.values, mask.counts
    n = item.num_classes
    hist = np.zeros(n + 1, dtype=np.int64)
    if item.mask_format == "labelIds":
        from sclseg.data.cityscapes import label_table

        valid = _valid_label_ids()
        bad = values[(values < 0) | (values > 255) | ~valid[np.clip(values, 0, 255)]]
        if bad.size:
            ids = np.flatnonzero(valid)
            return None, [Problem(str(item.mask), f"labelIds values {_shown(bad)} are no Cityscapes labelIds",
                                  f"ids of the official label table ({ids.min()}..{ids.max()}); a train-id "
                                  "file must be named *_labelTrainIds.png", item.split)]
        train = label_table().id_to_train[values]
        np.add.at(hist, np.where(train < n, train, n), counts)
        return hist, []
    ignore = item.ignore_value if item.mask_format == "index" else 255
    bad = values[((values < 0) | (values >= n)) & (values != ignore)]
    if bad.size:
        what = "train-id" if item.mask_format == "trainIds" else "mask"
        return None, [Problem(str(item.mask), f"{what} values {_shown(bad)} are neither class indices nor the ignore "
                                              "value",
                              f"class indices 0..{n - 1} ({n} classes) or the ignore value {ignore}", item.split)]
    np.add.at(hist, np.where(values == ignore, n, values).astype(np.int64), counts)
    return hist, []


@functools.lru_cache(maxsize=1)
def _valid_label_ids() -> np.ndarray:
    """``(256,)`` bool: which 8-bit values are ids of the official Cityscapes label table."""
    from cityscapesscripts.helpers.labels import labels

    valid = np.zeros(256, dtype=bool)
    valid[[label.id for label in labels if 0 <= label.id < 256]] = True
    return valid


def _size_problem(item: _Item, mask: tuple[int, int], image: tuple[int, int, int, int]) -> Problem:
    """A mask whose size is not its image's as displayed; names an orientation tag that turns the image."""
    shown = f"{image[1]}x{image[0]}"
    if image[:2] != image[2:]:
        return Problem(str(item.mask), f"mask is {mask[1]}x{mask[0]} (WxH), its image {item.image.name} is stored "
                       f"{image[3]}x{image[2]} but displayed {shown} (EXIF orientation tag)",
                       "a mask of the image as displayed (training reads images as displayed)", item.split)
    return Problem(str(item.mask), f"mask is {mask[1]}x{mask[0]} (WxH), its image {item.image.name} {shown}",
                   "a mask of its image's size", item.split)


def _check_item(item: _Item) -> _Result:
    """Decode the image and the mask of one item and check them against each other."""
    size, problems = _read_image(item.image, item.split)
    if item.mask is None:
        return _Result(problems, None, 1)
    mask, mask_problems = _read_mask(item.mask, item.split)
    problems += mask_problems
    if mask is None:
        return _Result(problems, None, 2)
    if size is not None and mask.size != size[:2]:
        problems.append(_size_problem(item, mask.size, size))
    hist, value_problems = _class_histogram(item, mask)
    problems += value_problems
    return _Result(problems, None if hist is None else hist.tolist(), 2)


# ---------------------------------------------------------------------------------------------
# what a config uses


@dataclass
class _Plan:
    """The items to check per split, items held in memory (digits), and problems of the layout."""

    items: list[_Item] = field(default_factory=list)
    memory: list[tuple[str, Any]] = field(default_factory=list)  # (split, dataset without files)
    layout: list[Problem] = field(default_factory=list)


def _dataset_items(split: str, dataset: Any) -> Optional[list[_Item]]:
    """File items of a folder or Cityscapes dataset; None for a dataset without files."""
    from sclseg.data.cityscapes import CityscapesDataset
    from sclseg.data.folder import FolderDataset

    dataset = getattr(dataset, "base", dataset)  # a TrainingView wraps the file-backed dataset
    n = dataset.num_classes
    if isinstance(dataset, FolderDataset):
        return [_Item(split, image, mask if dataset.labeled else None, "index", n, dataset.ignore_value)
                for image, mask in dataset.items]
    if isinstance(dataset, CityscapesDataset):
        return [_Item(split, it.image, it.label if dataset.labeled else None,
                      _cityscapes_format(it.label), n, 255) for it in dataset.items]
    return None


def _cityscapes_format(label: Optional[Path]) -> MaskFormat:
    return "trainIds" if label is not None and label.name.endswith("_labelTrainIds.png") else "labelIds"


def _folder_layout(cfg: Config) -> Optional[_Plan]:
    """Every pairing problem of a folder layout at once, with the pairs that do match.

    None when the pairing is sound (then the dataset builder's own splits are used).
    """
    from sclseg.data.folder import IMAGE_SUFFIXES, folder_classes, list_images

    root = Path(cfg.data.root).expanduser() if cfg.data.root else None
    if root is None or not root.is_dir():
        return None
    f = cfg.data.folder
    n = len(folder_classes(f.classes, f.colors))
    plan = _Plan()
    for split, base in ((_LABELED, root), ("val", root / "val"), ("test", root / "test")):
        image_dir, mask_dir = base / "images", base / "masks"
        if not image_dir.is_dir() or not mask_dir.is_dir():
            continue
        by_stem: dict[str, Path] = {}
        for path in list_images(image_dir):
            if path.stem in by_stem:
                plan.layout.append(Problem(str(path), f"shares the stem '{path.stem}' with {by_stem[path.stem].name}",
                                           "one image per stem (masks are matched by stem)", split))
                continue
            by_stem[path.stem] = path
        masks = {p.stem: p for p in mask_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
        for stem, image in by_stem.items():
            if stem in masks:
                plan.items.append(_Item(split, image, masks[stem], "index", n, f.ignore_value))
            else:
                plan.layout.append(Problem(str(image), "no mask", f"{mask_dir / (stem + '.png')}", split))
        for stem in sorted(set(masks) - set(by_stem)):
            plan.layout.append(Problem(str(masks[stem]), "mask without an image",
                                       f"{image_dir / stem}{{{','.join(IMAGE_SUFFIXES)}}}", split))
    if not plan.layout:
        return None
    if (root / "unlabeled").is_dir():
        plan.items += [_Item("unlabeled", p, None, "index", n, f.ignore_value) for p in list_images(root / "unlabeled")]
    return plan


def _cityscapes_layout(cfg: Config) -> Optional[_Plan]:
    """Every fine image of ``train``/``val`` without its ``gtFine`` label, with the pairs that match.

    None when no label is missing (the builder's error is then about something else).
    """
    from sclseg.data.cityscapes import IGNORE, NUM_CLASSES, _label_path_for, scan_split

    root = Path(cfg.data.root).expanduser() if cfg.data.root else None
    if root is None or not root.is_dir():
        return None
    plan = _Plan()
    for split in ("train", "val"):
        try:
            items = scan_split(root, split, with_labels=False)
        except (FileNotFoundError, ValueError):
            continue
        for it in items:
            label = _label_path_for(root, it.image)
            if label.is_file():
                plan.items.append(_Item(split, it.image, label, "labelIds", NUM_CLASSES, IGNORE))
            else:
                plan.layout.append(Problem(str(it.image), "no fine label", f"{label} (gtFine_trainvaltest.zip)", split))
    return plan if plan.layout else None


def _plan(cfg: Config, bundle: Optional[DataBundle]) -> _Plan:
    """What to check: the splits of ``bundle`` (built here when None), or the layout's pairs when
    the pairing of images and masks fails."""
    from sclseg.data import build_data

    if bundle is None:
        layout = _folder_layout(cfg) if cfg.data.name == "folder" else None
        if layout is not None:
            return layout
        try:
            bundle = build_data(cfg, for_training=False)
        except (FileNotFoundError, ValueError):
            layout = _cityscapes_layout(cfg) if cfg.data.name == "cityscapes" else None
            if layout is None:
                raise
            return layout
    plan = _Plan()
    splits: list[tuple[str, Any]] = [(_LABELED, bundle.labeled)]
    if bundle.unlabeled is not None:
        splits.append(("unlabeled", bundle.unlabeled))
    splits += sorted(bundle.eval_splits.items())
    for split, dataset in splits:
        items = _dataset_items(split, dataset)
        if items is None:
            plan.memory.append((split, dataset))
        else:
            plan.items += items
    return plan


def _check_in_memory(split: str, dataset: Any, ignore_index: int) -> tuple[list[Problem], np.ndarray]:
    """Sizes and values of a dataset that holds its samples in memory (the digit scenes)."""
    n = dataset.num_classes
    hist = np.zeros(n + 1, dtype=np.int64)
    problems: list[Problem] = []
    for i in range(len(dataset)):
        image, mask, name = dataset.load(i)
        if mask is None or not dataset.labeled:
            continue
        mask = mask.numpy()
        if mask.shape != tuple(image.shape[1:]):
            problems.append(Problem(name, f"mask is {mask.shape} (HxW), its image {tuple(image.shape[1:])}",
                                    "a mask of its image's size", split))
        values, counts = np.unique(mask, return_counts=True)
        bad = values[((values < 0) | (values >= n)) & (values != ignore_index)]
        if bad.size:
            problems.append(Problem(name, f"mask values {_shown(bad)}", f"0..{n - 1} or {ignore_index}", split))
            continue
        np.add.at(hist, np.where(values == ignore_index, n, values), counts)
    return problems, hist


# ---------------------------------------------------------------------------------------------
# cache


def _load_cache(path: Optional[Path]) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # an unreadable cache is rebuilt
    return data.get("items", {}) if data.get("version") == _CACHE_VERSION else {}


def _save_cache(path: Optional[Path], entries: dict[str, Any]) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": _CACHE_VERSION, "items": entries}, fh)
        os.replace(tmp, path)  # atomic: concurrent checks cannot corrupt it
    except OSError as exc:
        print(f"data check: could not write the cache {path} ({exc}); set data.class_uniform.cache_dir "
              "to a writable folder", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# the check


def _coverage(cfg: Config, class_names: list[str], hist: np.ndarray, n_masks: int) -> tuple[list[Problem],
                                                                                            list[Problem]]:
    """Classes no labeled mask contains: a problem while ignored pixels cover a large share (the
    0/255 trap of folder data), else a warning."""
    total = int(hist.sum())
    if total == 0:
        return [], []
    share = hist[-1] / total
    problems: list[Problem] = []
    warnings: list[Problem] = []
    where = str(Path(cfg.data.root).expanduser() / "masks") if cfg.data.name == "folder" else "labeled masks"
    for c in np.flatnonzero(hist[:-1] == 0):
        name = class_names[c]
        what = (f"class {c} ('{name}') never occurs in the {n_masks} labeled masks, while the ignore value "
                f"covers {share:.1%} of their pixels")
        if cfg.data.name == "folder" and share >= _TRAP_IGNORE_SHARE:
            ignore = cfg.data.folder.ignore_value
            problems.append(Problem(where, what, (
                f"'{name}' pixels to carry the value {c}: binary 0/{ignore} masks mark the objects with the ignore "
                f"value, so '{name}' is never trained; change the mask values ({ignore} -> {c}, e.g. "
                f"np.where(mask == {ignore}, {c}, mask)), or set data.folder.ignore_value to the value your masks "
                "really use for unlabelled pixels"), _LABELED))
        else:
            warnings.append(Problem(where, what, "labeled pixels of every class (a class without any is never trained)",
                                    _LABELED))
    return problems, warnings


def _class_names(cfg: Config) -> list[str]:
    if cfg.data.name == "folder":
        return list(cfg.data.folder.classes)
    if cfg.data.name == "cityscapes":
        from sclseg.data.cityscapes import cityscapes_classes

        return [c.name for c in cityscapes_classes()]
    from sclseg.data.digits import DIGIT_CLASSES

    return [c.name for c in DIGIT_CLASSES]


def _item_results(items: list, signatures: list, cached: dict, workers: int) -> dict[int, _Result]:
    """Each file's result by index: from the cache where its signature is unchanged, else decoded
    now on ``workers`` threads."""
    results: dict[int, _Result] = {}
    todo: list[int] = []
    for i, item in enumerate(items):
        entry = cached.get(item.key())
        if entry is not None and entry["sig"] == signatures[i]:
            results[i] = _Result([Problem(**p) for p in entry["problems"]], entry["hist"])
        else:
            todo.append(i)
    if todo:
        with ThreadPoolExecutor(workers) as pool:
            for i, result in zip(todo, pool.map(_check_item, [items[i] for i in todo])):
                results[i] = result
    return results


def check_data(cfg: Config, *, workers: Optional[int] = None, cache: bool = True,
               bundle: Optional[DataBundle] = None) -> DataCheckReport:
    """Check every image and mask of every split ``cfg`` uses; collect every problem.

    ``workers``: threads decoding files (default: the CPU count, at most 16; Pillow decodes
    without holding the GIL). ``cache``: reuse and
    update the results of earlier checks (``data_check.json`` in the dataset's cache folder).
    Errors of the config itself (missing ``data.root``, unknown data name) are raised as
    :class:`ConfigError` / ``FileNotFoundError`` as by the dataset builder. ``bundle``: the
    splits already built for ``cfg`` (e.g. by a trainer), so that they are not built twice.
    """
    start = time.perf_counter()
    n_workers = max(1, workers if workers is not None else min(16, os.cpu_count() or 1))
    plan = _plan(cfg, bundle)
    cache_path = check_cache_path(cfg) if cache else None
    cached = _load_cache(cache_path)

    signatures = [item.signature() for item in plan.items]
    results = _item_results(plan.items, signatures, cached, n_workers)

    problems = list(plan.layout)
    class_names = _class_names(cfg)
    hist = np.zeros(len(class_names) + 1, dtype=np.int64)
    n_masks = 0
    splits: dict[str, int] = {}
    for i, item in enumerate(plan.items):
        result = results[i]
        problems += result.problems
        splits[item.split] = splits.get(item.split, 0) + 1
        if item.split == _LABELED and result.hist is not None:
            hist += np.asarray(result.hist, dtype=np.int64)
            n_masks += 1
    for split, dataset in plan.memory:
        found, counts = _check_in_memory(split, dataset, getattr(dataset, "ignore_index", 255))
        problems += found
        splits[split] = len(dataset)
        if split == _LABELED:
            hist += counts
            n_masks += len(dataset)
    trap, warnings = _coverage(cfg, class_names, hist, n_masks)
    problems += trap

    if cache_path is not None:
        entries = {}
        for i, item in enumerate(plan.items):
            result = results[i]
            entries[item.key()] = {"sig": signatures[i], "problems": [asdict(p) for p in result.problems],
                                   "hist": result.hist}
        _save_cache(cache_path, entries)
    files = sum(1 + (item.mask is not None) for item in plan.items)
    return DataCheckReport(
        problems=problems,
        warnings=warnings,
        files=files,
        read=sum(r.read for r in results.values()),
        seconds=time.perf_counter() - start,
        splits=splits,
        class_pixels={name: int(hist[c]) for c, name in enumerate(class_names)},
        ignored_pixels=int(hist[-1]),
        workers=n_workers,
        cache=None if cache_path is None else str(cache_path),
    )
