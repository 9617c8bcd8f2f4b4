"""Your own data: a folder of images and index-PNG masks.

Layout (``ROOT`` is ``data.root``)::

    ROOT/images/NAME.png|jpg|...     labeled images
    ROOT/masks/NAME.png              one index PNG per image (same stem): pixel value = class index
    ROOT/unlabeled/*.png|jpg|...     optional: images without masks
    ROOT/val/images/ + ROOT/val/masks/    optional: evaluation split (else data.folder.val_fraction
                                          of images/ is held out for it)
    ROOT/test/images/ + ROOT/test/masks/  optional: a second evaluation split

Masks are single-channel PNGs (mode ``L``, ``P`` or 16-bit), values ``0 .. C-1`` for the
``C`` classes of ``data.folder.classes`` and ``data.folder.ignore_value`` (default 255) for
unlabelled pixels. Pairing (every image has a mask, every mask an image) is checked when the
dataset is built; sizes and values when a sample is loaded. Every problem is a
``FileNotFoundError`` / ``ValueError`` that names the file and what was expected.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from sclseg.config import Config, ConfigError
from sclseg.data.base import ClassInfo, JointTransform, SegmentationDataset, dataset_root
from sclseg.data.bundle import DataBundle, training_view
from sclseg.data.splits import fraction_split

__all__ = [
    "IMAGE_SUFFIXES",
    "FolderDataset",
    "build_folder",
    "default_palette",
    "folder_classes",
    "list_images",
    "read_image",
    "read_label_png",
    "displayed_size",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PathLike = Union[str, Path]


_TURNED = (5, 6, 7, 8)  # EXIF orientations that turn the stored pixels by 90 degrees for display
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L")  # 16-bit greyscale (PNG, TIFF); "I" also 32-bit TIFF


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """``(H, W)`` of an opened image as viewers show it, its EXIF orientation tag applied."""
    turned = img.getexif().get(0x0112, 1) in _TURNED
    return (img.width, img.height) if turned else (img.height, img.width)


def _rgb8(img: Image.Image, path: Path) -> np.ndarray:
    """uint8 ``(H, W, 3)`` of a decoded image; 16-bit greyscale keeps its full range (0..65535 -> 0..255)."""
    if img.mode in _WIDE_MODES:
        values = np.asarray(img).astype(np.float64)
        if values.max(initial=0) > 65535 or values.min(initial=0) < 0:
            raise ValueError(f"{path}: 32-bit image (values {values.min():g}..{values.max():g}); expected 8- or "
                             "16-bit")
        return np.repeat(np.rint(values * (255 / 65535)).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode == "F":
        raise ValueError(f"{path}: floating-point image (mode F); expected an 8- or 16-bit image")
    return np.asarray(img.convert("RGB"))


def read_image(path: PathLike) -> Tensor:
    """uint8 ``(3, H, W)`` RGB as the image is displayed: its EXIF orientation applied (phone photos).

    16-bit greyscale images are read over their whole range at 8-bit precision (the pipeline then
    scales 0..255 to [0, 1]). A missing, corrupt or truncated file is a clear error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            rgb = _rgb8(ImageOps.exif_transpose(img), path)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: cannot read image ({exc}); expected a readable, complete image file") from exc
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def read_label_png(path: PathLike) -> np.ndarray:
    """A single-channel label PNG (mode L, P, I;16 or I) as an integer ``(H, W)`` array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise ValueError(
                    f"{path}: label image has mode {mode} ({len(img.getbands())} channels); expected a "
                    "single-channel index PNG (mode L or P) whose pixel values are class indices"
                )
            array = np.asarray(img)
    except ValueError:
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: cannot read label image ({exc}); expected a complete index PNG") from exc
    return array.astype(np.int64) if array.dtype == bool else array


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (sorted by name)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def default_palette(n: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved), first ``n`` colours."""
    colours = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours.append((r, g, b))
    return colours


def folder_classes(names: Sequence[str], colors: Optional[Sequence[Sequence[int]]] = None) -> list[ClassInfo]:
    if not names:
        raise ConfigError("data.folder.classes is empty: list the class names, mask value i = classes[i]")
    if len(set(names)) != len(names):
        raise ConfigError(f"data.folder.classes has duplicate names: {list(names)}")
    if colors is None:
        colors = default_palette(len(names))
    if len(colors) != len(names):
        raise ConfigError(f"data.folder.colors has {len(colors)} entries for {len(names)} classes")
    out = []
    for name, colour in zip(names, colors):
        if len(colour) != 3 or not all(0 <= int(v) <= 255 for v in colour):
            raise ConfigError(f"data.folder.colors: class '{name}' needs [R, G, B] in 0..255, got {list(colour)}")
        out.append(ClassInfo(str(name), (int(colour[0]), int(colour[1]), int(colour[2]))))
    return out


class FolderDataset(SegmentationDataset):
    """Images (and index-PNG masks) listed as ``(image path, mask path or None)`` pairs."""

    def __init__(
        self,
        items: Sequence[tuple[Path, Optional[Path]]],
        classes: Sequence[ClassInfo],
        *,
        ignore_value: int = 255,
        ignore_index: int = 255,
        labeled: bool = True,
        transform: Optional[JointTransform] = None,
        root: Optional[Path] = None,
        split: str = "train",
    ) -> None:
        super().__init__(labeled=labeled, transform=transform)
        self.items = [(Path(i), None if m is None else Path(m)) for i, m in items]
        if labeled and any(m is None for _, m in self.items):
            missing = next(i for i, m in self.items if m is None)
            raise ValueError(f"{missing}: a labeled dataset needs a mask for every image")
        self.classes = list(classes)
        self.ignore_value = ignore_value
        self.ignore_index = ignore_index
        self.root = root
        self.split = split

    def __len__(self) -> int:
        return len(self.items)

    @property
    def label_files(self) -> list[Path]:
        return [m for _, m in self.items if m is not None]

    def _mask(self, index: int, size: Optional[tuple[int, int]]) -> Tensor:
        image_path, mask_path = self.items[index]
        assert mask_path is not None
        mask = read_label_png(mask_path)
        if size is not None and mask.shape != size:
            raise ValueError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path.name} is "
                f"{size[1]}x{size[0]} (as displayed: its EXIF orientation tag applied, if it has one); expected a "
                "mask of the image's size"
            )
        n = len(self.classes)
        if mask.size and (mask.max() >= n or mask.min() < 0):
            values = np.unique(mask)
            bad = values[((values < 0) | (values >= n)) & (values != self.ignore_value)]
            if bad.size:
                shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
                raise ValueError(
                    f"{mask_path}: mask values {shown} are neither class indices 0..{n - 1} ({n} classes in "
                    f"data.folder.classes) nor the ignore value {self.ignore_value}"
                )
        out = torch.from_numpy(mask.astype(np.int64))
        if self.ignore_value != self.ignore_index:
            out[out == self.ignore_value] = self.ignore_index
        return out

    def load(self, index: int) -> tuple[Tensor, Optional[Tensor], str]:
        image_path, mask_path = self.items[index]
        image = read_image(image_path)
        mask = None
        if self.labeled and mask_path is not None:
            mask = self._mask(index, (image.shape[1], image.shape[2]))
        return image, mask, image_path.stem

    def load_label(self, index: int) -> Tensor:
        """The mask alone (its size is not checked against the image: no image decode)."""
        return self._mask(index, None)


def _pairs(image_dir: Path, mask_dir: Path) -> list[tuple[Path, Optional[Path]]]:
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir} not found: expected a folder of images ({', '.join(IMAGE_SUFFIXES)})")
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"{mask_dir} not found: expected one index PNG per image in {image_dir}")
    images = list_images(image_dir)
    if not images:
        raise ValueError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)}); the split would be empty")
    by_stem: dict[str, Path] = {}
    for path in images:
        if path.stem in by_stem:
            raise ValueError(f"{path} and {by_stem[path.stem]} share the stem '{path.stem}'; masks are matched by stem")
        by_stem[path.stem] = path
    masks = {p.stem: p for p in mask_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    pairs = []
    for stem, image in by_stem.items():
        if stem not in masks:
            raise ValueError(f"{image}: no mask; expected {mask_dir / (stem + '.png')}")
        pairs.append((image, masks[stem]))
    orphans = sorted(set(masks) - set(by_stem))
    if orphans:
        raise ValueError(f"{masks[orphans[0]]}: mask without an image (expected {image_dir / orphans[0]}.png|jpg|...)"
                         + (f"; {len(orphans) - 1} more" if len(orphans) > 1 else ""))
    return pairs


def build_folder(cfg: Config, *, for_training: bool = True):
    """The :class:`~sclseg.data.DataBundle` of ``data.name: folder``."""

    f = cfg.data.folder
    root = dataset_root(cfg.data.root, "folder", "images/ and masks/")
    classes = folder_classes(f.classes, f.colors)
    common = dict(ignore_value=f.ignore_value, ignore_index=cfg.data.ignore_index, root=root)

    pairs = _pairs(root / "images", root / "masks")
    eval_splits: dict[str, SegmentationDataset] = {}
    if (root / "val").exists():
        eval_splits["val"] = FolderDataset(_pairs(root / "val" / "images", root / "val" / "masks"), classes,
                                           split="val", **common)
    elif f.val_fraction > 0:
        if len(pairs) < 2:
            raise ValueError(f"{root / 'images'}: {len(pairs)} image(s) cannot be split into train and val; "
                             "add images or ROOT/val/, or set data.folder.val_fraction: 0")
        val_idx, train_idx = fraction_split(len(pairs), fraction=f.val_fraction, seed=f.split_seed + 1000)
        if len(train_idx) == 0:
            raise ValueError(f"{root / 'images'}: val_fraction {f.val_fraction} leaves no training images")
        eval_splits["val"] = FolderDataset([pairs[i] for i in val_idx], classes, split="val", **common)
        print(f"folder data: {len(val_idx)} of {len(pairs)} images of {root / 'images'} held out as 'val' "
              "(data.folder.val_fraction)", file=sys.stderr)
        pairs = [pairs[i] for i in train_idx]
    if (root / "test").exists():
        eval_splits["test"] = FolderDataset(_pairs(root / "test" / "images", root / "test" / "masks"), classes,
                                            split="test", **common)
    if for_training and not eval_splits:
        print(f"folder data: {root} has no evaluation split (no val/ or test/, data.folder.val_fraction 0): the run "
              "trains without evaluation and writes no best.pt", file=sys.stderr)

    held_back: list[tuple[Path, Optional[Path]]] = []
    if f.labeled_fraction is not None:
        try:
            lab_idx, rest_idx = fraction_split(len(pairs), fraction=f.labeled_fraction, seed=f.split_seed)
        except ValueError as exc:
            raise ConfigError(f"data.folder.labeled_fraction: {exc}") from None
        held_back = [(pairs[i][0], None) for i in rest_idx]
        pairs = [pairs[i] for i in lab_idx]

    unlabeled_items = list(held_back)
    unlabeled_dir = root / "unlabeled"
    if unlabeled_dir.exists():
        extra = list_images(unlabeled_dir)
        if not extra:
            raise ValueError(f"{unlabeled_dir}: no images ({', '.join(IMAGE_SUFFIXES)}); remove the folder or add "
                             "images")
        unlabeled_items += [(p, None) for p in extra]

    labeled = FolderDataset(pairs, classes, split="train", **common)
    unlabeled = FolderDataset(unlabeled_items, classes, labeled=False, split="unlabeled",
                              **common) if unlabeled_items else None
    return DataBundle(
        labeled=training_view(cfg, labeled, class_uniform=for_training),
        unlabeled=training_view(cfg, unlabeled) if unlabeled is not None else None,
        eval_splits=eval_splits,
        classes=classes,
        ignore_index=cfg.data.ignore_index,
    )
