"""What every dataset of sclseg provides: class metadata and samples as tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["ClassInfo", "SegmentationDataset", "Sample", "dataset_root", "palette_array"]

Sample = dict  # {"image": FloatTensor (3, H, W) in [0, 1], "mask": LongTensor (H, W) (labeled only), "name": str}
JointTransform = Callable[[Tensor, Optional[Tensor]], tuple[Tensor, Optional[Tensor]]]


@dataclass(frozen=True)
class ClassInfo:
    """One class: its name and display colour (RGB 0-255)."""

    name: str
    color: tuple[int, int, int]


def palette_array(classes: Sequence[ClassInfo], ignore_index: int = 255) -> np.ndarray:
    """``(256, 3)`` uint8 palette: class colours, black for the ignore value and the rest."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index, info in enumerate(classes):
        palette[index] = info.color
    if 0 <= ignore_index < 256 and ignore_index >= len(classes):
        palette[ignore_index] = (0, 0, 0)
    return palette


def dataset_root(root: Optional[str], name: str, expected: str) -> Path:
    """``data.root`` as a Path; a clear error when it is unset or missing.

    ``expected`` says what the folder should hold, e.g. ``"images/ and masks/"``.
    """
    from sclseg.config import ConfigError

    if root is None:
        raise ConfigError(f"data.root is required for data.name '{name}' (the folder holding {expected})")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data.root {path} not found: expected a folder with {expected}")
    return path


class SegmentationDataset(Dataset):
    """Base class: subclasses implement :meth:`load` returning a uint8 image and a label map.

    ``__getitem__`` returns a :data:`Sample`: the image as float ``(3, H, W)`` in ``[0, 1]``,
    the label map as long ``(H, W)`` (absent when ``labeled`` is False), and a name. An optional
    joint ``transform(image, mask) -> (image, mask)`` is applied to both, keeping them aligned.
    """

    classes: list[ClassInfo]
    ignore_index: int = 255

    def __init__(self, *, labeled: bool = True, transform: Optional[JointTransform] = None) -> None:
        self.labeled = labeled
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, index: int) -> tuple[Tensor, Optional[Tensor], str]:
        """``(uint8 image (3, H, W), long label (H, W) or None, name)``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def __getitem__(self, index: int) -> Sample:
        image, mask, name = self.load(index)
        if not self.labeled:
            mask = None
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        sample: Sample = {"image": image, "name": name}
        if mask is not None:
            sample["mask"] = mask.long()
        return sample
