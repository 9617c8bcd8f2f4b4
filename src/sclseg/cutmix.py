"""CutMix box masks with "last box owns the pixel" semantics.

The paper (section 3.2) mixes two unlabeled images with N boxes of random size, aspect ratio
and position whose union covers about half of the image. Boxes are pasted in order and later
boxes overwrite earlier ones, so every covered pixel has exactly one *owner*: the index of the
last box that covers it. The structured consistency loss is computed inside each owner region.

Sizing. Each box is a continuous interval per axis, ``[s, s + L)`` in units of the image side,
with its start ``s`` uniform on ``[-L, 1)`` and clipped to the image. A pixel centre is then
covered along that axis with probability ``u = L / (1 + L)`` wherever it lies (no border bias),
and by the box with probability ``u * v``. Drawing ``u`` and ``v`` independently with mean
``sqrt(c)`` gives every pixel the same chance ``c`` per box, so the expected union of N
independent boxes is ``1 - (1 - c) ** N``; solving for ``c`` makes it equal ``area`` for any N
and any image size. Widths vary by up to +-50% around the mean per axis (random size and aspect
ratio). Unlike French et al.'s public generator, overlaps are overwritten, not XOR-ed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["sample_boxes", "box_owner_map", "BoxMaskGenerator", "OneBoxGenerator", "mix"]

_MAX_AXIS_COVERAGE = 0.9  # keeps the extent L = u / (1 - u) of the largest boxes finite


def _check_sizes(n_boxes: int, height: int, width: int, area: float) -> None:
    if not isinstance(n_boxes, int) or n_boxes < 1:
        raise ValueError(f"n_boxes must be an int >= 1, got {n_boxes!r}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got height={height}, width={width}")
    if not 0.0 < area < 1.0:
        raise ValueError(f"area must be in (0, 1), got {area!r}")


def _axis_coverage_range(n_boxes: int, area: float) -> tuple[float, float]:
    """Lower and upper bound of the per-axis coverage ``u``; its mean is ``sqrt(c)``."""
    per_box = 1.0 - (1.0 - area) ** (1.0 / n_boxes)
    mean = math.sqrt(per_box)
    spread = max(0.0, min(0.5, (_MAX_AXIS_COVERAGE - mean) / mean))
    return mean * (1.0 - spread), mean * (1.0 + spread)


def _sample_boxes(
    shape: tuple[int, ...],
    n_boxes: int,
    height: int,
    width: int,
    area: float,
    generator: Optional[torch.Generator],
    device: Optional[torch.device],
) -> Tensor:
    """Boxes of shape ``(*shape, n_boxes, 4)`` as ``(y0, x0, y1, x1)`` pixel rows, half-open."""
    _check_sizes(n_boxes, height, width, area)
    if generator is not None:
        device = generator.device
    lo, hi = _axis_coverage_range(n_boxes, area)
    rand = torch.rand((*shape, n_boxes, 4), generator=generator, device=device, dtype=torch.float64)
    coverage = lo + (hi - lo) * rand[..., :2]  # (..., n, 2): per-axis u for y and x
    extent = coverage / (1.0 - coverage)  # L, in units of the image side
    start = -extent + (1.0 + extent) * rand[..., 2:]  # s ~ U(-L, 1)
    size = torch.tensor([height, width], dtype=torch.float64, device=rand.device)
    # pixel p (centre (p + 0.5) / size) is inside iff s <= (p + 0.5) / size < s + L
    lo_px = torch.ceil(start * size - 0.5)
    hi_px = torch.ceil((start + extent) * size - 0.5)
    lo_px = torch.minimum(lo_px.clamp(min=0), size)
    hi_px = torch.minimum(hi_px.clamp(min=0), size)
    return torch.cat([lo_px, hi_px], dim=-1).long()


def sample_boxes(
    n_boxes: int,
    height: int,
    width: int,
    *,
    area: float = 0.5,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Sample ``n_boxes`` CutMix boxes for one image.

    Returns:
        LongTensor ``(n_boxes, 4)``; rows ``(y0, x0, y1, x1)``, half-open pixel ranges, in paste
        order. A box can be empty (``y0 == y1``) when it falls outside the image. The union of
        the boxes covers ``area * height * width`` pixels on average. The tensor lives on the
        generator's device (CPU when no generator is given).
    """
    return _sample_boxes((), n_boxes, height, width, area, generator, None)


def _owner_maps(boxes: Tensor, height: int, width: int) -> Tensor:
    """Owner maps ``(B, H, W)`` of boxes ``(B, N, 4)``: one vectorised pass per box index."""
    batch, n_boxes = boxes.shape[:2]
    ys = torch.arange(height, device=boxes.device)
    xs = torch.arange(width, device=boxes.device)
    rows = (ys >= boxes[..., 0:1]) & (ys < boxes[..., 2:3])  # (B, N, H)
    cols = (xs >= boxes[..., 1:2]) & (xs < boxes[..., 3:4])  # (B, N, W)
    owner = torch.full((batch, height, width), -1, dtype=torch.long, device=boxes.device)
    for n in range(n_boxes):  # later boxes overwrite earlier ones
        owner.masked_fill_(rows[:, n, :, None] & cols[:, n, None, :], n)
    return owner


def box_owner_map(boxes: Tensor, height: int, width: int) -> Tensor:
    """Index of the last box covering each pixel, -1 where no box covers it.

    Args:
        boxes: ``(N, 4)`` integer rows ``(y0, x0, y1, x1)``, half-open, in paste order.
    Returns:
        LongTensor ``(height, width)`` on ``boxes.device``.
    """
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if boxes.is_floating_point() or boxes.dtype == torch.bool:
        raise ValueError(f"boxes must be an integer tensor, got dtype {boxes.dtype}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got height={height}, width={width}")
    return _owner_maps(boxes[None], height, width)[0]


class BoxMaskGenerator:
    """Batches of CutMix owner maps: N boxes per image, union ~``area`` of the image.

    >>> owner = BoxMaskGenerator(n_boxes=32)(4, 64, 64)   # LongTensor (4, 64, 64), -1 = no box
    """

    def __init__(self, n_boxes: int = 32, area: float = 0.5) -> None:
        _check_sizes(n_boxes, 1, 1, area)
        self.n_boxes = n_boxes
        self.area = area

    def __repr__(self) -> str:
        return f"BoxMaskGenerator(n_boxes={self.n_boxes}, area={self.area})"

    def sample_boxes(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: Optional[torch.Generator] = None,
        *,
        device: Optional[torch.device | str] = None,
    ) -> Tensor:
        """Boxes ``(batch_size, n_boxes, 4)`` for a batch, rows as in :func:`sample_boxes`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        dev = torch.device(device) if device is not None else None
        if generator is not None and dev is not None and generator.device.type != dev.type:
            raise ValueError(f"generator is on {generator.device} but device={dev} was requested")
        return _sample_boxes((batch_size,), self.n_boxes, height, width, self.area, generator, dev)

    def __call__(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: Optional[torch.Generator] = None,
        *,
        device: Optional[torch.device | str] = None,
    ) -> Tensor:
        """Owner maps: LongTensor ``(batch_size, height, width)`` with values in ``[-1, n_boxes)``.

        The maps are built on ``device`` (default: the generator's device, else CPU).
        """
        boxes = self.sample_boxes(batch_size, height, width, generator, device=device)
        return _owner_maps(boxes, height, width)


class OneBoxGenerator:
    """UniMatch's CutMix box (``obtain_cutmix_box`` of UniMatch V1/V2), batched: owner maps with
    0 inside one box and -1 elsewhere.

    Per image: with probability ``1 - prob`` no box; else an area ``s`` uniform in ``area`` (a
    share of ``H * W``), then candidates until one fits: aspect ``r`` uniform in ``aspect``, width
    ``int(sqrt(s / r))``, height ``int(sqrt(s * r))``, top-left ``x`` uniform in ``0..W-1``, ``y`` in
    ``0..H-1``, kept when ``x + w <= W`` and ``y + h <= H``. ``tries`` candidates are drawn per image
    at once on the generator's device (more follow in the rare case that none fits), so a batch
    needs no per-candidate round trip to the host.

    >>> owner = OneBoxGenerator()(4, 64, 64)   # LongTensor (4, 64, 64): 0 in the box, -1 elsewhere
    """

    def __init__(self, prob: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
                 aspect: tuple[float, float] = (0.3, 1 / 0.3), tries: int = 64) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob!r}")
        if not 0.0 < area[0] <= area[1] < 1.0:
            raise ValueError(f"area must be (low, high) with 0 < low <= high < 1, got {area!r}")
        if not 0.0 < aspect[0] <= aspect[1]:
            raise ValueError(f"aspect must be (low, high) with 0 < low <= high, got {aspect!r}")
        self.prob, self.area, self.aspect, self.tries = float(prob), tuple(area), tuple(aspect), int(tries)

    def __repr__(self) -> str:
        return f"OneBoxGenerator(prob={self.prob}, area={self.area}, aspect={self.aspect})"

    def sample_boxes(self, batch_size: int, height: int, width: int, generator: Optional[torch.Generator] = None,
                     *, device: Optional[torch.device | str] = None) -> Tensor:
        """Boxes ``(batch_size, 1, 4)`` as ``(y0, x0, y1, x1)`` rows; an image without a box has an empty row."""
        _check_sizes(1, height, width, 0.5)
        dev = generator.device if generator is not None else torch.device(device or "cpu")
        opts = {"generator": generator, "device": dev, "dtype": torch.float64}
        has_box = torch.rand(batch_size, **opts) < self.prob
        size = (self.area[0] + (self.area[1] - self.area[0]) * torch.rand(batch_size, 1, **opts)) * height * width
        boxes = torch.zeros(batch_size, 4, dtype=torch.long, device=dev)
        placed = ~has_box
        while not bool(placed.all()):
            u = torch.rand(batch_size, self.tries, 3, **opts)
            ratio = self.aspect[0] + (self.aspect[1] - self.aspect[0]) * u[..., 0]
            box_w, box_h = torch.sqrt(size / ratio).floor().long(), torch.sqrt(size * ratio).floor().long()
            x, y = (u[..., 1] * width).floor().long(), (u[..., 2] * height).floor().long()
            fits = (x + box_w <= width) & (y + box_h <= height)
            first = torch.where(fits, torch.arange(self.tries, 0, -1, device=dev), 0).argmax(dim=1, keepdim=True)
            pick = torch.stack([y, x, y + box_h, x + box_w], dim=-1).gather(1, first[..., None].expand(-1, -1, 4))[:, 0]
            new = ~placed & fits.any(dim=1)
            boxes = torch.where(new[:, None], pick, boxes)
            placed = placed | new
        return boxes[:, None]

    def __call__(self, batch_size: int, height: int, width: int, generator: Optional[torch.Generator] = None,
                 *, device: Optional[torch.device | str] = None) -> Tensor:
        """Owner maps: LongTensor ``(batch_size, height, width)``, 0 inside the box, -1 elsewhere."""
        return _owner_maps(self.sample_boxes(batch_size, height, width, generator, device=device), height, width)


def mix(a: Tensor, b: Tensor, owner: Tensor) -> Tensor:
    """``a`` where ``owner >= 0`` (inside a box), ``b`` elsewhere.

    Args:
        a, b: ``(B, C, H, W)`` or ``(B, H, W)``, same shape.
        owner: ``(B, H, W)`` integer owner map.
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim not in (3, 4):
        raise ValueError(f"a and b must be (B, C, H, W) or (B, H, W), got {a.ndim} dims")
    expected = (a.shape[0], *a.shape[-2:])
    if owner.shape != expected:
        raise ValueError(f"owner must have shape {expected} (B, H, W of a), got {tuple(owner.shape)}")
    if not (a.device == b.device == owner.device):
        raise ValueError(f"a, b and owner must be on one device, got {a.device}, {b.device}, {owner.device}")
    inside = owner >= 0
    if a.ndim == 4:
        inside = inside[:, None]
    return torch.where(inside, a, b)
