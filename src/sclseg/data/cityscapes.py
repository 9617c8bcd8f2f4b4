"""Cityscapes: the standard layout, the official label table, semi-supervised splits.

Layout (``ROOT`` is ``data.root``)::

    ROOT/leftImg8bit/{train,val,test,train_extra}/CITY/CITY_SEQ_FRAME_leftImg8bit.png
    ROOT/gtFine/{train,val,test}/CITY/CITY_SEQ_FRAME_gtFine_labelIds.png
    ROOT/gtCoarse/...                       (not used: coarse labels are ignored)

``*_gtFine_labelIds.png`` are mapped to the 19 train ids with the official label table of the
``cityscapesscripts`` package (optional extra ``cityscapes``); everything else becomes 255
(ignore). Pre-converted ``*_labelTrainIds.png`` files (recognised by name) are read as they are.

Pools (``data.cityscapes``): labeled = fine ``train`` (or ``train`` + ``val``); held back =
fine images whose labels a split leaves out (a ``split_dir`` of UniMatch/CPS list files, or a
seeded ``labeled_fraction`` / ``labeled_count``); unlabeled = held back (optional) +
``train_extra`` images (optional). Unlabeled images never need label files.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from sclseg.config import Config, ConfigError
from sclseg.data.base import ClassInfo, JointTransform, SegmentationDataset, dataset_root
from sclseg.data.bundle import DataBundle, training_view
from sclseg.data.folder import read_image, read_label_png
from sclseg.data.splits import SplitEntry, fraction_split, read_split_dir, resolve_in_root

__all__ = [
    "CityscapesDataset",
    "CityscapesItem",
    "MissingExtraError",
    "build_cityscapes",
    "cityscapes_classes",
    "cityscapes_stem",
    "items_from_split_entries",
    "label_ids_to_train_ids",
    "label_table",
    "scan_split",
    "train_ids_to_label_ids",
    "with_fine_label",
]

NUM_CLASSES = 19
IGNORE = 255
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"
_TRAIN_ID_SUFFIX = "_labelTrainIds.png"
PathLike = Union[str, Path]


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is not installed (also a ValueError, so the CLI reports it plainly)."""


@dataclass(frozen=True)
class LabelTable:
    classes: list[ClassInfo]  # the 19 train-id classes, in train-id order
    id_to_train: np.ndarray  # (256,) uint8: labelId -> trainId, 255 for ignored / unknown ids
    train_to_id: np.ndarray  # (256,) uint8: trainId -> labelId, 0 ('unlabeled') for 255 / unknown


@functools.lru_cache(maxsize=1)
def label_table() -> LabelTable:
    """The official Cityscapes label table (from ``cityscapesscripts.helpers.labels``)."""
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError as exc:
        raise MissingExtraError(
            "Cityscapes support needs the official label table of the 'cityscapesscripts' package, the optional "
            "extra 'cityscapes': pip install 'sclseg[cityscapes]' (or pip install cityscapesscripts)"
        ) from exc
    id_to_train = np.full(256, IGNORE, dtype=np.uint8)
    train_to_id = np.zeros(256, dtype=np.uint8)
    by_train: dict[int, ClassInfo] = {}
    for label in labels:
        if 0 <= label.id < 256 and 0 <= label.trainId < IGNORE:
            id_to_train[label.id] = label.trainId
            train_to_id[label.trainId] = label.id
            by_train[label.trainId] = ClassInfo(label.name, tuple(int(c) for c in label.color))
    if sorted(by_train) != list(range(NUM_CLASSES)):
        raise RuntimeError(f"unexpected cityscapesscripts label table: train ids {sorted(by_train)}")
    return LabelTable([by_train[t] for t in range(NUM_CLASSES)], id_to_train, train_to_id)


def cityscapes_classes() -> list[ClassInfo]:
    """The 19 evaluation classes (names and colours of the official table), by train id."""
    return list(label_table().classes)


def label_ids_to_train_ids(label_ids: Union[np.ndarray, Tensor]) -> Union[np.ndarray, Tensor]:
    """Map labelIds (0..33) to train ids (0..18), 255 for ignored and unknown ids."""
    lut = label_table().id_to_train
    if isinstance(label_ids, Tensor):
        values = label_ids.long()
        out = torch.from_numpy(lut.astype(np.int64))[values.clamp(0, 255)]
        return torch.where((values < 0) | (values > 255), torch.full_like(out, IGNORE), out)
    values = np.asarray(label_ids).astype(np.int64)
    return np.where((values < 0) | (values > 255), IGNORE, lut[np.clip(values, 0, 255)]).astype(np.uint8)


def train_ids_to_label_ids(train_ids: Union[np.ndarray, Tensor]) -> np.ndarray:
    """Map train ids (0..18) to labelIds as uint8; 255 and anything else becomes 0 ('unlabeled')."""
    if isinstance(train_ids, Tensor):
        train_ids = train_ids.detach().cpu().numpy()
    values = np.asarray(train_ids).astype(np.int64)
    valid = (values >= 0) & (values < NUM_CLASSES)
    return np.where(valid, label_table().train_to_id[np.clip(values, 0, 255)], 0).astype(np.uint8)


def cityscapes_stem(name: str) -> str:
    """``aachen_000000_000019_leftImg8bit(.png)`` -> ``aachen_000000_000019`` (other names unchanged)."""
    stem = Path(name).name
    for suffix in (".png", ".jpg"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    for tag in ("_leftImg8bit", "_gtFine_labelIds", "_gtFine_labelTrainIds", "_gtCoarse_labelIds"):
        if stem.endswith(tag):
            return stem[: -len(tag)]
    return stem


@dataclass(frozen=True)
class CityscapesItem:
    image: Path
    label: Optional[Path]
    name: str


def _label_path_for(root: Path, image: Path) -> Path:
    """``leftImg8bit/SPLIT/CITY/X_leftImg8bit.png`` -> ``gtFine/SPLIT/CITY/X_gtFine_labelIds.png``."""
    rel = image.relative_to(root) if image.is_relative_to(root) else image
    parts = list(rel.parts)
    if "leftImg8bit" in parts:
        parts[parts.index("leftImg8bit")] = "gtFine"
    name = parts[-1]
    parts[-1] = (name[: -len(_IMAGE_SUFFIX)] if name.endswith(_IMAGE_SUFFIX) else Path(name).stem) + _LABEL_SUFFIX
    out = Path(*parts)
    return out if out.is_absolute() else root / out


def scan_split(root: PathLike, split: str, *, with_labels: bool = True) -> list[CityscapesItem]:
    """All images of ``leftImg8bit/<split>/*/`` (sorted), with their fine labelIds files.

    A missing folder or label file is a ``FileNotFoundError`` naming what was expected.
    """
    root = Path(root)
    folder = root / "leftImg8bit" / split
    if not folder.is_dir():
        hint = " (leftImg8bit_trainextra.zip)" if split == "train_extra" else " (leftImg8bit_trainvaltest.zip)"
        raise FileNotFoundError(f"{folder} not found: expected the Cityscapes layout "
                                f"leftImg8bit/{split}/CITY/*{_IMAGE_SUFFIX}{hint}")
    images = sorted(folder.glob(f"*/*{_IMAGE_SUFFIX}"))
    if not images:
        raise ValueError(f"{folder}: no images (expected CITY/*{_IMAGE_SUFFIX}); the split would be empty")
    items = [CityscapesItem(image, None, cityscapes_stem(image.name)) for image in images]
    return [with_fine_label(root, it) for it in items] if with_labels else items


def with_fine_label(root: PathLike, item: CityscapesItem) -> CityscapesItem:
    """``item`` with its ``gtFine/.../*_gtFine_labelIds.png`` (which must exist)."""
    label = _label_path_for(Path(root), item.image)
    if not label.is_file():
        raise FileNotFoundError(f"{item.image}: no fine label; expected {label} (gtFine_trainvaltest.zip)")
    return CityscapesItem(item.image, label, item.name)


def _find_by_id(root: Path, token: str) -> Optional[Path]:
    city = token.split("_")[0]
    for split in ("train", "val", "test", "train_extra"):
        path = root / "leftImg8bit" / split / city / f"{token}{_IMAGE_SUFFIX}"
        if path.is_file():
            return path
    return None


def _resolve_image(root: Path, token: str, source: str) -> Path:
    path = resolve_in_root(root, token)
    if path.is_file():
        return path
    candidates = [path]
    if "/" not in token and "." not in token:  # an image id: CITY_SEQ_FRAME
        found = _find_by_id(root, token)
        if found is not None:
            return found
        candidates = [root / "leftImg8bit" / "SPLIT" / token.split("_")[0] / f"{token}{_IMAGE_SUFFIX}"]
    elif not Path(token).is_absolute() and not token.startswith("leftImg8bit"):
        alt = root / "leftImg8bit" / token
        if alt.is_file():
            return alt
        candidates.append(alt)
    raise FileNotFoundError(f"{source}: image {token!r} not found (looked for {', '.join(str(c) for c in candidates)})")


def items_from_split_entries(root: PathLike, entries: Sequence[SplitEntry], *, labeled: bool,
                             source: str) -> list[CityscapesItem]:
    """Resolve split-file lines (paths relative to ``root``, or image ids) to items.

    Labeled: the listed label (``*_labelTrainIds.png`` may fall back to its ``*_labelIds.png``
    sibling when not pre-converted), or the fine labelIds file derived from the image path.
    Unlabeled: label paths are ignored.
    """
    root = Path(root)
    items = []
    for entry in entries:
        image = _resolve_image(root, entry.image, source)
        label = None
        if labeled:
            if entry.label is not None:
                label = resolve_in_root(root, entry.label)
                if not label.is_file():
                    fallback = None
                    if label.name.endswith("_gtFine" + _TRAIN_ID_SUFFIX):
                        fallback = label.with_name(label.name[: -len(_TRAIN_ID_SUFFIX)] + "_labelIds.png")
                    if fallback is not None and fallback.is_file():
                        label = fallback
                    else:
                        extra = f" or {fallback}" if fallback is not None else ""
                        raise FileNotFoundError(f"{source}: label of {entry.image} not found: expected {label}{extra}")
            else:
                label = _label_path_for(root, image)
                if not label.is_file():
                    raise FileNotFoundError(f"{source}: {entry.image} has no label path and {label} does not exist")
        items.append(CityscapesItem(image, label, cityscapes_stem(image.name)))
    return items


class CityscapesDataset(SegmentationDataset):
    """Cityscapes images with train-id labels (19 classes, 255 ignore)."""

    ignore_index = IGNORE

    def __init__(
        self,
        root: PathLike,
        items: Sequence[CityscapesItem],
        *,
        split: str = "train",
        labeled: bool = True,
        transform: Optional[JointTransform] = None,
    ) -> None:
        super().__init__(labeled=labeled, transform=transform)
        self.root = Path(root)
        self.items = list(items)
        self.split = split
        self.classes = cityscapes_classes()  # needs the 'cityscapes' extra: fail at construction
        if labeled:
            missing = [it.image for it in self.items if it.label is None]
            if missing:
                raise ValueError(f"{missing[0]}: a labeled Cityscapes split needs a label file for every image")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def label_files(self) -> list[Path]:
        return [it.label for it in self.items if it.label is not None]

    def load_label_array(self, index: int) -> np.ndarray:
        """Train ids 0..18 / 255 of item ``index`` as a uint8 ``(H, W)`` array (no image decode)."""
        item = self.items[index]
        if item.label is None:
            raise ValueError(f"{item.image}: no label file")
        raw = read_label_png(item.label)
        if item.label.name.endswith(_TRAIN_ID_SUFFIX):
            bad = (raw >= NUM_CLASSES) & (raw != IGNORE)
            if bad.any():
                raise ValueError(f"{item.label}: train-id label with values "
                                 f"{sorted(set(np.unique(raw[bad]).tolist()))[:10]}; "
                                 f"expected 0..{NUM_CLASSES - 1} or {IGNORE}")
            return raw.astype(np.uint8)
        return label_ids_to_train_ids(raw)

    def load_label(self, index: int) -> Tensor:
        return torch.from_numpy(self.load_label_array(index).astype(np.int64))

    def load(self, index: int) -> tuple[Tensor, Optional[Tensor], str]:
        item = self.items[index]
        image = read_image(item.image)
        label = None
        if self.labeled:
            label = self.load_label(index)
            if tuple(label.shape) != tuple(image.shape[1:]):
                raise ValueError(f"{item.label}: label is {tuple(label.shape)} (HxW) but {item.image.name} is "
                                 f"{tuple(image.shape[1:])}; expected one size")
        return image, label, item.name


def build_cityscapes(cfg: Config, *, for_training: bool = True):
    """The :class:`~sclseg.data.DataBundle` of ``data.name: cityscapes``."""

    cs = cfg.data.cityscapes
    root = dataset_root(cfg.data.root, "cityscapes", "leftImg8bit/ and gtFine/")
    label_table()  # the extra, before any scanning

    fine_splits = ["train"] if cs.labeled == "train" else ["train", "val"]

    def fine_pool(with_labels: bool) -> list[CityscapesItem]:
        return [item for split in fine_splits for item in scan_split(root, split, with_labels=with_labels)]

    held_back: list[CityscapesItem] = []  # fine images whose labels are not used (need no label files)
    if cs.split_dir is not None:
        split_path = Path(cs.split_dir).expanduser()
        if not split_path.exists() and not split_path.is_absolute() and (root / split_path).exists():
            split_path = root / split_path
        lists = read_split_dir(split_path)
        labeled_items = items_from_split_entries(root, lists.labeled, labeled=True, source=str(lists.labeled_file))
        if lists.unlabeled is not None:
            held_back = items_from_split_entries(root, lists.unlabeled, labeled=False, source=str(lists.unlabeled_file))
        else:
            chosen = {it.image.resolve() for it in labeled_items}
            held_back = [it for it in fine_pool(False) if it.image.resolve() not in chosen]
    elif cs.labeled_fraction is not None or cs.labeled_count is not None:
        pool = fine_pool(False)
        try:
            lab_idx, rest_idx = fraction_split(len(pool), fraction=cs.labeled_fraction, count=cs.labeled_count,
                                               seed=cs.split_seed)
        except ValueError as exc:
            raise ConfigError(f"data.cityscapes: {exc}") from None
        labeled_items = [with_fine_label(root, pool[i]) for i in lab_idx]
        held_back = [pool[i] for i in rest_idx]
    else:
        labeled_items = fine_pool(True)

    unlabeled_items: list[CityscapesItem] = []
    if cs.held_back_unlabeled:
        unlabeled_items += [CityscapesItem(it.image, None, it.name) for it in held_back]
    if cs.extra_unlabeled:
        try:
            unlabeled_items += scan_split(root, "train_extra", with_labels=False)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{exc}; or set data.cityscapes.extra_unlabeled: false") from None

    labeled = CityscapesDataset(root, labeled_items, split="train")
    unlabeled = CityscapesDataset(root, unlabeled_items, split="unlabeled", labeled=False) if unlabeled_items else None
    eval_splits: dict[str, SegmentationDataset] = {"val": CityscapesDataset(root, scan_split(root, "val"), split="val")}
    if cs.labeled == "trainval":
        print("cityscapes: val is part of the labeled training data (labeled: trainval); "
              "scores on 'val' are not held-out numbers", file=sys.stderr)
    print(f"cityscapes: {len(labeled)} labeled, {len(unlabeled_items)} unlabeled, {len(eval_splits['val'])} val images",
          file=sys.stderr)
    return DataBundle(
        labeled=training_view(cfg, labeled, class_uniform=for_training),
        unlabeled=training_view(cfg, unlabeled) if unlabeled is not None else None,
        eval_splits=eval_splits,
        classes=cityscapes_classes(),
        ignore_index=IGNORE,
    )
