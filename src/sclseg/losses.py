"""The three losses of the method: Eq. 2 (relaxed CE), Eq. 4 (pixel consistency), Eq. 5-10 (SCL).

All losses accept float32, bfloat16 or float16 inputs and accumulate in float32. None of them
detaches its inputs: the caller computes teacher outputs under ``torch.no_grad()``.

Structured consistency, how it is computed. For a region T with unit-normalised student
vectors ``q_i`` and teacher vectors ``r_i`` (rows of ``Q`` and ``R``, ``|T| x C``)::

    sum_{i,j in T} (q_i.q_j - r_i.r_j)^2 = |Q^T Q|_F^2 - 2 |Q^T R|_F^2 + |R^T R|_F^2

so the exact mean over all ``|T|^2`` ordered pairs (Eq. 8, diagonal included) costs
``O(|T| C^2)`` with three ``C x C`` Gram matrices and never forms a pair matrix. Regions with
more than ``max_pairs`` pairs are estimated without bias, in one of two ways: from ``max_pairs``
ordered pairs drawn uniformly, independently and with replacement from ``T x T`` (Eq. 9-10,
``sampling="pairs"``, the default), or from all pairs among ``isqrt(max_pairs)`` pixels drawn
uniformly from ``T`` (``sampling="pixels"``: the same Gram identity on the drawn pixels, about
200 times fewer pixel reads). Pixels are grouped by region with one sort of the owner map;
everything else touches only the sampled pixels, in one batched pass over all images and boxes.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "consistency_loss",
    "structured_consistency_loss",
    "relaxed_boundary_loss",
    "dense_structured_consistency_loss",
]

_EPS = 1e-8

PairSampling = Literal["pairs", "pixels"]


def _check_prob_pair(student_probs: Tensor, teacher_probs: Tensor) -> None:
    if student_probs.ndim != 4:
        raise ValueError(f"student_probs must be (B, C, H, W), got shape {tuple(student_probs.shape)}")
    if teacher_probs.shape != student_probs.shape:
        raise ValueError(
            f"teacher_probs must match student_probs {tuple(student_probs.shape)}, "
            f"got {tuple(teacher_probs.shape)}"
        )
    if teacher_probs.device != student_probs.device:
        raise ValueError(
            f"student_probs and teacher_probs must be on one device, "
            f"got {student_probs.device} and {teacher_probs.device}"
        )


def _check_map(name: str, tensor: Tensor, probs: Tensor) -> None:
    expected = (probs.shape[0], *probs.shape[2:])
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} (B, H, W of the maps), got {tuple(tensor.shape)}")
    if tensor.device != probs.device:
        raise ValueError(f"{name} is on {tensor.device} but the maps are on {probs.device}")


def consistency_loss(student_probs: Tensor, teacher_probs: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Eq. 4: squared L2 distance of the class vectors, averaged over pixels.

    Args:
        student_probs, teacher_probs: ``(B, C, H, W)`` probabilities.
        mask: optional ``(B, H, W)`` weights (bool or float); the average is taken over it.
    Returns:
        Scalar float32 tensor.
    """
    _check_prob_pair(student_probs, teacher_probs)
    per_pixel = (student_probs.float() - teacher_probs.float()).pow(2).sum(dim=1)  # (B, H, W)
    if mask is None:
        return per_pixel.mean()
    _check_map("mask", mask, student_probs)
    weight = mask.float()
    total = weight.sum()  # a weighted mean for any positive total; 0 for an empty mask
    return (per_pixel * weight).sum() / torch.where(total > 0, total, torch.ones_like(total))


def _gather_pixels(probs: Tensor, positions: Tensor) -> Tensor:
    """Class vectors at per-image pixel positions, float32.

    Args:
        probs: ``(B, C, H, W)``.
        positions: ``(B, *S)`` flat positions ``y * W + x`` within each image.
    Returns:
        ``(B, C, *S)``. The backward pass is a scatter-add in the maps' own layout.
    """
    batch, channels = probs.shape[:2]
    index = positions.reshape(batch, 1, -1).expand(batch, channels, -1)
    picked = torch.gather(probs.reshape(batch, channels, -1), 2, index)
    return picked.reshape(batch, channels, *positions.shape[1:]).float()


def _unit(x: Tensor) -> Tensor:
    """Vectors along dim 1 scaled to unit length (eps-guarded)."""
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(_EPS)


def _cosine(x: Tensor, y: Tensor) -> Tensor:
    """Cosine similarity over dim 1 (classes), eps-guarded: ``(B, C, *S) -> (B, *S)``."""
    norms = (x.pow(2).sum(dim=1) * y.pow(2).sum(dim=1)).sqrt()
    return (x * y).sum(dim=1) / norms.clamp_min(_EPS)


def structured_consistency_loss(
    student_probs: Tensor,
    teacher_probs: Tensor,
    owner: Tensor,
    *,
    n_boxes: int = 32,
    last_boxes: int = 16,
    max_pairs: Optional[int] = 9000,
    generator: Optional[torch.Generator] = None,
    sampling: PairSampling = "pairs",
) -> Tensor:
    """Eq. 5-10: consistency of inter-pixel cosine similarities inside the last CutMix boxes.

    For each image b and box n in ``n_boxes - last_boxes .. n_boxes - 1``, the region is
    ``T = {owner[b] == n}``. Its loss is the mean of ``(a^s_ij - a^t_ij)^2`` over all ordered
    pairs of ``T x T`` (diagonal included) when ``max_pairs is None`` or ``|T|^2 <= max_pairs``,
    else an unbiased estimate of that mean from at most ``max_pairs`` random pairs. The result
    is the mean over non-empty regions, and a zero that is still in the graph when every
    region is empty.

    ``sampling`` chooses the estimate for regions with ``|T|^2 > max_pairs``:

    * ``"pairs"`` (the paper's Eq. 9-10): ``max_pairs`` ordered pairs, each drawn i.i.d.
      uniformly from ``T x T``. Reads ``2 * max_pairs`` pixel vectors per region.
    * ``"pixels"``: ``k = isqrt(max_pairs)`` pixels drawn i.i.d. uniformly from ``T``, and
      all ``k (k - 1)`` ordered pairs of distinct draws (a U-statistic, unbiased too). Reads
      ``k`` pixel vectors per region (94 instead of 18,000 for N_pair = 9000), so it costs
      next to nothing at any image size; its variance is higher, as the pairs share pixels.
      A draw paired with itself is left to the Gram sums, where it adds
      ``(a^s_ii - a^t_ii)^2``: 0 for non-zero vectors (probabilities always are), so the
      estimate is unbiased for them; an all-zero vector in one map only would add
      ``1 / (k - 1)`` of the regions' mean diagonal gap.

    Args:
        student_probs, teacher_probs: ``(B, C, H, W)`` probabilities (or any non-negative maps).
        owner: ``(B, H, W)`` integer owner map from :mod:`sclseg.cutmix` (-1 = no box).
        n_boxes: N, the number of boxes the owner map was made with.
        last_boxes: N_box, how many of the last boxes are used.
        max_pairs: N_pair, the most pairs per region; ``None`` for the exact loss everywhere.
        generator: draws the sampled pairs; must be on the maps' device.
        sampling: ``"pairs"`` or ``"pixels"``, see above.
    Returns:
        Scalar float32 tensor.
    """
    _check_prob_pair(student_probs, teacher_probs)
    _check_map("owner", owner, student_probs)
    if sampling not in ("pairs", "pixels"):
        raise ValueError(f"sampling must be 'pairs' or 'pixels', got {sampling!r}")
    if owner.is_floating_point() or owner.dtype == torch.bool:
        raise ValueError(f"owner must be an integer tensor, got dtype {owner.dtype}")
    if not isinstance(n_boxes, int) or n_boxes < 1:
        raise ValueError(f"n_boxes must be an int >= 1, got {n_boxes!r}")
    if not isinstance(last_boxes, int) or not 1 <= last_boxes <= n_boxes:
        raise ValueError(f"last_boxes must be an int in [1, n_boxes={n_boxes}], got {last_boxes!r}")
    if max_pairs is not None and (not isinstance(max_pairs, int) or max_pairs < 1):
        raise ValueError(f"max_pairs must be None or an int >= 1, got {max_pairs!r}")
    if sampling == "pixels" and max_pairs is not None and max_pairs < 4:
        raise ValueError(f"sampling='pixels' draws isqrt(max_pairs) >= 2 pixels per region: max_pairs must be >= 4, got {max_pairs}")
    device = student_probs.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the maps are on {device}")

    batch, _, height, width = student_probs.shape
    n_pixels = height * width
    # per image: region key 0..last_boxes-1 for the counted boxes, last_boxes elsewhere
    local = owner.reshape(batch, n_pixels) - (n_boxes - last_boxes)
    key = torch.where((local >= 0) & (local < last_boxes), local, last_boxes)
    order = torch.sort(key, dim=1, stable=True).indices  # (B, HW) positions grouped by region
    counts = torch.zeros(batch, last_boxes + 1, dtype=torch.long, device=device)
    counts = counts.scatter_add_(1, key, torch.ones_like(key))[:, :last_boxes]  # (B, N)
    offsets = torch.cumsum(counts, 1) - counts
    nonempty = counts > 0
    sampled = max_pairs is not None and max_pairs < n_pixels * n_pixels
    if sampled:
        exact = nonempty & (counts * counts <= max_pairs)
        exact_width = math.isqrt(max_pairs)  # |T|^2 <= max_pairs bounds an exact region's size
    else:
        exact = nonempty
        exact_width = int(counts.max())  # the one host sync, in the exact-only mode alone
    denom = counts.clamp_min(1)

    def positions(local_index: Tensor) -> Tensor:
        """Pixel positions ``(B, N * S)`` of region-local indices ``(B, N, S)``."""
        flat = (offsets[..., None] + local_index).reshape(batch, -1).clamp(max=n_pixels - 1)
        return torch.gather(order, 1, flat)

    # exact regions: every pixel, padded to exact_width; sampled regions: 2 x max_pairs pixels
    # ("pairs") or exact_width pixels drawn in the exact regions' slots ("pixels")
    rank = torch.arange(max(exact_width, 1), device=device)
    first = rank.expand(batch, last_boxes, -1)
    by_pixels = sampled and sampling == "pixels"
    if by_pixels:
        u = torch.rand((batch, last_boxes, rank.numel()), generator=generator, device=device, dtype=torch.float64)
        drawn = torch.minimum((u * denom[..., None]).long(), (denom - 1)[..., None])
        first = torch.where(exact[..., None], first, drawn)
    picks = [positions(first)]
    n_sampled = 0
    if sampled and not by_pixels:
        u = torch.rand((batch, last_boxes, 2 * max_pairs), generator=generator, device=device, dtype=torch.float64)
        local_idx = torch.minimum((u * denom[..., None]).long(), (denom - 1)[..., None])
        picks.append(positions(local_idx))
        n_sampled = 2 * max_pairs
    # region-major layout (B, N, P + 2M) to match the view below; one gather per map
    pos = torch.cat([p.view(batch, last_boxes, -1) for p in picks], dim=2).reshape(batch, -1)
    s_pix = _gather_pixels(student_probs, pos).view(batch, -1, last_boxes, rank.numel() + n_sampled)
    t_pix = _gather_pixels(teacher_probs, pos).view(batch, -1, last_boxes, rank.numel() + n_sampled)

    # all ordered pairs of the first P slots through C x C Gram matrices of unit vectors:
    # every pixel of an exact region, or the k = P draws of a "pixels"-sampled one
    slots = (rank < counts[..., None]) & exact[..., None]
    if by_pixels:
        slots = slots | (nonempty & ~exact)[..., None]
    keep = slots.unsqueeze(1)  # (B, 1, N, P)
    q = _unit(s_pix[..., : rank.numel()]) * keep  # (B, C, N, P)
    r = _unit(t_pix[..., : rank.numel()]) * keep

    def frob2(x: Tensor, y: Tensor) -> Tensor:
        return torch.einsum("bcnp,bdnp->bncd", x, y).pow(2).sum(dim=(2, 3))

    pair_sum = frob2(q, q) - 2.0 * frob2(q, r) + frob2(r, r)  # (B, N)
    # a draw paired with itself adds (1 - 1)^2 = 0 (non-zero vectors): the k (k - 1) distinct pairs remain
    pairs = torch.where(exact, denom * denom, rank.numel() * (rank.numel() - 1)) if by_pixels else denom * denom
    region_loss = pair_sum / pairs.clamp_min(1).float()

    if sampled and not by_pixels:
        # sampled: max_pairs ordered pairs (i, j), each i.i.d. uniform on T x T
        s_i, s_j = s_pix[..., rank.numel() :].chunk(2, dim=-1)  # (B, C, N, M) each
        t_i, t_j = t_pix[..., rank.numel() :].chunk(2, dim=-1)
        gap = _cosine(s_i, s_j) - _cosine(t_i, t_j)  # (B, N, M)
        region_loss = torch.where(exact, region_loss, gap.pow(2).mean(dim=2))

    region_loss = torch.where(nonempty, region_loss, torch.zeros_like(region_loss))
    return region_loss.sum() / nonempty.sum().clamp_min(1).float()


def dense_structured_consistency_loss(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Eq. 6, all pixel pairs of each image, averaged over images. Reference only.

    Builds the ``(B, HW, HW)`` similarity matrices literally, so it costs O((HW)^2) memory:
    for tests and benchmarks, never for training.
    """
    _check_prob_pair(student_probs, teacher_probs)
    batch, channels = student_probs.shape[:2]
    q = F.normalize(student_probs.float().reshape(batch, channels, -1), dim=1, eps=_EPS)
    r = F.normalize(teacher_probs.float().reshape(batch, channels, -1), dim=1, eps=_EPS)
    a_s = torch.bmm(q.transpose(1, 2), q)
    a_t = torch.bmm(r.transpose(1, 2), r)
    return (a_s - a_t).pow(2).mean()


def relaxed_boundary_loss(logits: Tensor, target: Tensor, *, window: int = 3, ignore_index: int = 255) -> Tensor:
    """Eq. 2: cross-entropy with boundary label relaxation (Zhu et al.).

    Per valid pixel the loss is ``-log(sum of softmax probabilities over the classes present
    in its window x window neighbourhood)``; the window is clipped at the image border and
    ignore pixels bring no class. The log of the sum is a logsumexp of log-probabilities, so
    it stays finite when a probability underflows. Mean over valid pixels (0, in the graph,
    when there is none). ``window=1`` equals ``F.cross_entropy(..., ignore_index=...)``.

    Args:
        logits: ``(B, C, H, W)``.
        target: ``(B, H, W)`` class indices in ``[0, C)`` or ``ignore_index``.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    _check_map("target", target, logits)
    if target.is_floating_point():
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    if not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd int >= 1, got {window!r}")
    valid = target != ignore_index
    classes = torch.where(valid, target, 0).long()
    log_probs = F.log_softmax(logits.float(), dim=1)
    if window == 1:
        # only the pixel's own class is present: the logsumexp below is its log-probability,
        # exactly (max + log(exp(0))), so a gather gives the same loss and gradients bit for bit
        per_pixel = -log_probs.gather(1, classes[:, None]).squeeze(1)
    else:
        one_hot = torch.zeros_like(logits, dtype=torch.float32)
        one_hot.scatter_(1, classes[:, None], valid[:, None].float())
        present = F.max_pool2d(one_hot, window, stride=1, padding=window // 2) > 0
        present = present | ~valid[:, None]  # keeps ignored pixels finite; they are masked below
        per_pixel = -torch.logsumexp(log_probs.masked_fill(~present, float("-inf")), dim=1)
    per_pixel = torch.where(valid, per_pixel, torch.zeros_like(per_pixel))
    return per_pixel.sum() / valid.sum().clamp_min(1).float()
