"""The losses: the paper's three, Eq. 2 (relaxed CE), Eq. 4 (pixel consistency), Eq. 5-10 (SCL), and
the two of the weak-to-strong methods (FixMatch, UniMatch): the confidence-masked pseudo-label
cross-entropy and UniMatch's OHEM cross-entropy for labeled images.

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
everything else touches only the sampled pixels, in one batched pass over all images and boxes
and one read of each map, whose gradient is one map.

The pieces, each a function of tensors that can be checked on its own: :func:`group_regions`
(the sort), :func:`read_regions` (the read), the pixel choices :func:`exact_slots`,
:func:`drawn_slots` and :func:`pair_draws`, and the two estimators on class vectors,
:func:`gram_region_losses` (all pairs of a set of slots) and :func:`pair_region_losses`
(listed pairs).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "consistency_loss",
    "structured_consistency_loss",
    "relaxed_boundary_loss",
    "dense_structured_consistency_loss",
    "pseudo_label_loss",
    "ohem_cross_entropy",
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


def _check_logits_target(logits: Tensor, target: Tensor) -> None:
    """Logits ``(B, C, H, W)`` and integer labels ``(B, H, W)`` on one device."""
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    _check_map("target", target, logits)
    if target.is_floating_point():
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")


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


class Regions(NamedTuple):
    """The pixels of each image grouped by counted region (one stable sort of the owner map).

    Attributes:
        order: ``(B, HW)`` flat pixel positions ``y * W + x``: region 0's in raster order, then
            region 1's, ..., then the pixels of no counted region.
        counts: ``(B, N)`` region sizes ``|T|`` (``N = last_boxes``; region n is box ``n_boxes - N + n``).
        offsets: ``(B, N)`` where each region starts in ``order``.
    """

    order: Tensor
    counts: Tensor
    offsets: Tensor


def group_regions(owner: Tensor, n_boxes: int, last_boxes: int) -> Regions:
    """Group the pixels of ``owner`` ``(B, H, W)`` by the last ``last_boxes`` of ``n_boxes`` boxes."""
    batch = owner.shape[0]
    local = owner.reshape(batch, -1) - (n_boxes - last_boxes)
    key = torch.where((local >= 0) & (local < last_boxes), local, last_boxes)  # uncounted pixels last
    narrow = torch.uint8 if last_boxes < 256 else torch.int32  # the same order, a faster sort
    order = torch.sort(key.to(narrow), dim=1, stable=True).indices
    counts = torch.zeros(batch, last_boxes + 1, dtype=torch.long, device=owner.device)
    counts = counts.scatter_add_(1, key, torch.ones_like(key))[:, :last_boxes]
    return Regions(order, counts, torch.cumsum(counts, 1) - counts)


def read_regions(probs: Tensor, regions: Regions, *local_indices: Tensor) -> list[Tensor]:
    """Class vectors at region-local pixel indices, with one gradient map for all of them.

    Args:
        probs: ``(B, C, H, W)``.
        regions: from :func:`group_regions`.
        local_indices: ``(B, N, S_k)`` indices into each region's pixels; an index at or past
            ``|T|`` (a padding slot) reads some other pixel, for the caller to mask.
    Returns:
        One ``(B, C, N, S_k)`` float32 tensor per index tensor. The backward pass scatters the
        gradients of all of them into a single map (:class:`_GatherParts`).
    """
    batch, channels = probs.shape[:2]
    rows = torch.cat([(regions.offsets[..., None] + i).reshape(batch, -1) for i in local_indices], dim=1)
    positions = torch.gather(regions.order, 1, rows.clamp(max=regions.order.shape[1] - 1))
    parts = positions.split([i[0].numel() for i in local_indices], dim=1)
    pixels = _GatherParts.apply(probs.reshape(batch, channels, -1), *parts)
    return [p.float().view(batch, channels, *i.shape[1:]) for p, i in zip(pixels, local_indices)]


class _GatherParts(torch.autograd.Function):
    """``(B, C, HW)`` map read at ``(B, S_k)`` flat positions, one ``(B, C, S_k)`` tensor per part.

    Autograd through one gather split into parts would concatenate the parts' gradients (zeros for
    a part without one) before scattering them; the backward pass here scatters each part's
    gradient into the one map directly.
    """

    @staticmethod
    def forward(ctx, flat: Tensor, *positions: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        batch, channels = flat.shape[:2]
        ctx.save_for_backward(*positions)
        ctx.set_materialize_grads(False)  # a part that takes no part in the loss is skipped, not scattered as zeros
        ctx.map_shape, ctx.map_dtype = flat.shape, flat.dtype
        return tuple(torch.gather(flat, 2, pos[:, None].expand(batch, channels, -1)) for pos in positions)

    @staticmethod
    def backward(ctx, *grads: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:  # type: ignore[override]
        positions = ctx.saved_tensors
        grad_map = None
        if ctx.needs_input_grad[0]:
            grad_map = torch.zeros(ctx.map_shape, dtype=ctx.map_dtype, device=positions[0].device)
            for grad, pos in zip(grads, positions):
                if grad is not None:
                    grad_map.scatter_add_(2, pos[:, None].expand_as(grad), grad)
        return (grad_map, *([None] * len(positions)))


def draw_uniform(counts: Tensor, samples: int, generator: Optional[torch.Generator]) -> Tensor:
    """``(B, N, samples)`` region-local indices, i.i.d. uniform on each region (0 for an empty one).

    ``counts``: ``(B, N)`` region sizes. Draws ``B * N * samples`` float64 numbers from
    ``generator``, in that layout.
    """
    u = torch.rand((*counts.shape, samples), generator=generator, device=counts.device, dtype=torch.float64)
    size = counts.clamp_min(1)[..., None]
    return torch.minimum((u * size).long(), size - 1)


class Slots(NamedTuple):
    """Pixels of each region whose pairs are all summed (:func:`gram_region_losses`).

    Attributes:
        index: ``(B, N, P)`` region-local pixel index of each slot.
        used: ``(B, N, P)`` bool, the slots that take part; the others count as zero vectors.
        n_pairs: ``(B, N)`` integer divisor of each region's pair sum.
    """

    index: Tensor
    used: Tensor
    n_pairs: Tensor


def exact_slots(counts: Tensor, width: int) -> Slots:
    """Eq. 8: every pixel of each region with ``|T| <= width``, over all ``|T|^2`` ordered pairs.

    A larger region fills its ``width`` slots with its first pixels, for the caller to replace.
    """
    rank = torch.arange(max(width, 1), device=counts.device)
    return Slots(rank.expand(*counts.shape, -1), rank < counts[..., None], counts.pow(2))


def drawn_slots(counts: Tensor, k: int, exact: Tensor, generator: Optional[torch.Generator]) -> Slots:
    """:func:`exact_slots` where ``exact`` ``(B, N)``, elsewhere ``k >= 2`` pixels drawn from ``T``.

    A drawn region takes ``k`` pixels i.i.d. uniformly from ``T`` and divides by the ``k (k - 1)``
    ordered pairs of distinct draws (a U-statistic, unbiased for Eq. 8). A draw paired with itself
    stays in the Gram sums, where it adds ``(a^s_ii - a^t_ii)^2``: 0 for non-zero vectors
    (probabilities always are); an all-zero vector in one map only would add ``1 / (k - 1)`` of the
    region's mean diagonal gap. Draws ``B * N * k`` numbers from ``generator``.
    """
    rank = torch.arange(k, device=counts.device)
    index = torch.where(exact[..., None], rank, draw_uniform(counts, k, generator))
    used = ((rank < counts[..., None]) & exact[..., None]) | ((counts > 0) & ~exact)[..., None]
    return Slots(index, used, torch.where(exact, counts.pow(2), k * (k - 1)))


def pair_draws(counts: Tensor, n_pairs: int, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
    """Eq. 9-10: ``n_pairs`` ordered pairs per region, each i.i.d. uniform on ``T x T``.

    Returns the region-local indices of the first and of the second pixels, ``(B, N, n_pairs)``
    each. Draws ``B * N * 2 * n_pairs`` numbers from ``generator`` (the first pixels, then the
    second ones).
    """
    first, second = draw_uniform(counts, 2 * n_pairs, generator).split(n_pairs, dim=-1)
    return first, second


def _unit(x: Tensor) -> Tensor:
    """Vectors along dim 1 scaled to unit length (eps-guarded)."""
    return x / x.pow(2).sum(dim=1, keepdim=True).sqrt().clamp_min(_EPS)


def gram_region_losses(student: Tensor, teacher: Tensor, slots: Slots) -> Tensor:
    """Squared similarity gaps summed over all ordered pairs of each region's used slots, over ``n_pairs``.

    With the unit student and teacher vectors of the used slots as the rows of ``Q`` and ``R``::

        sum_{i,j} (q_i.q_j - r_i.r_j)^2 = |Q^T Q|_F^2 - 2 |Q^T R|_F^2 + |R^T R|_F^2

    three ``C x C`` Gram matrices per region, never a pair matrix.

    Args:
        student, teacher: ``(B, C, N, P)`` class vectors of the slots (:func:`read_regions`).
        slots: which slots are used and the divisors.
    Returns:
        ``(B, N)`` float32.
    """
    keep = slots.used[:, None]  # (B, 1, N, P)
    q, r = _unit(student) * keep, _unit(teacher) * keep

    def frob2(x: Tensor, y: Tensor) -> Tensor:
        return torch.einsum("bcnp,bdnp->bncd", x, y).pow(2).sum(dim=(2, 3))

    pair_sum = frob2(q, q) - 2.0 * frob2(q, r) + frob2(r, r)
    return pair_sum / slots.n_pairs.clamp_min(1).float()


def pair_region_losses(
    student_first: Tensor, student_second: Tensor, teacher_first: Tensor, teacher_second: Tensor
) -> Tensor:
    """Mean over pairs of ``(a^s_ij - a^t_ij)^2``: four ``(B, C, N, M)`` vector sets -> ``(B, N)``.

    ``a_ij = x_i.x_j / max(|x_i| |x_j|, eps)``, as in :func:`dense_structured_consistency_loss`.
    """
    gap = _PairCosine.apply(student_first, student_second) - _PairCosine.apply(teacher_first, teacher_second)
    return gap.pow(2).mean(dim=2)


class _PairCosine(torch.autograd.Function):
    """Cosine similarity over dim 1 of two ``(B, C, *S)`` vector sets -> ``(B, *S)``, eps-guarded.

    The backward pass is written out: autograd through the norms and the dot product would keep
    and multiply about three times as many ``(B, C, *S)`` temporaries, and the sampled pairs are
    millions of vectors.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:  # type: ignore[override]
        sq_x, sq_y, dot = _channel_dots(x, y)
        norms = (sq_x * sq_y).sqrt()
        denom = norms.clamp_min(_EPS)
        cos = dot / denom
        ctx.save_for_backward(x, y, sq_x, sq_y, norms >= _EPS, denom, cos)
        return cos

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:  # type: ignore[override]
        x, y, sq_x, sq_y, unclamped, denom, cos = ctx.saved_tensors
        # d cos / dx = y / denom - cos x / |x|^2; the second term is absent where eps clamps denom
        along = (grad / denom).unsqueeze(1)
        zero = torch.zeros_like(grad)
        grad_x = grad_y = None
        if ctx.needs_input_grad[0]:
            radial = torch.where(unclamped, grad * cos / sq_x, zero).unsqueeze(1)
            grad_x = (y * along).addcmul_(x, radial, value=-1.0)
        if ctx.needs_input_grad[1]:
            radial = torch.where(unclamped, grad * cos / sq_y, zero).unsqueeze(1)
            grad_y = (x * along).addcmul_(y, radial, value=-1.0)
        return grad_x, grad_y


def _channel_dots(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(x.x, y.y, x.y)`` over dim 1 of two ``(B, C, *S)`` tensors, each ``(B, *S)``.

    One pass over the channels, accumulating in place: ``torch.linalg.vecdot`` over dim 1 would
    write a full ``(B, C, *S)`` product for each of the three before reducing it.
    """
    xx, yy, xy = x[:, 0] * x[:, 0], y[:, 0] * y[:, 0], x[:, 0] * y[:, 0]
    for c in range(1, x.shape[1]):
        xc, yc = x[:, c], y[:, c]
        xx.addcmul_(xc, xc)
        yy.addcmul_(yc, yc)
        xy.addcmul_(xc, yc)
    return xx, yy, xy


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
    pairs of ``T x T`` (diagonal included) when ``max_pairs is None`` or ``|T|^2 <= max_pairs``
    (:func:`exact_slots` and :func:`gram_region_losses`), else an unbiased estimate of that mean.
    The result is the mean over non-empty regions, and a zero that is still in the graph when
    every region is empty.

    ``sampling`` chooses the estimate for regions with ``|T|^2 > max_pairs``:

    * ``"pairs"`` (the paper's Eq. 9-10, :func:`pair_draws` and :func:`pair_region_losses`):
      ``max_pairs`` ordered pairs, each drawn i.i.d. uniformly from ``T x T``.
    * ``"pixels"`` (:func:`drawn_slots` and :func:`gram_region_losses`): ``k = isqrt(max_pairs)`` pixels drawn
      i.i.d. uniformly from ``T`` and all ``k (k - 1)`` ordered pairs of distinct draws, unbiased
      too. It reads ``k`` pixel vectors per region (94 instead of 18,000 for N_pair = 9000), so it
      costs next to nothing at any image size; its variance is higher, as the pairs share pixels.

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
    _check_scl_args(student_probs, teacher_probs, owner, n_boxes, last_boxes, max_pairs, generator, sampling)
    regions = group_regions(owner, n_boxes, last_boxes)
    counts = regions.counts
    n_pixels = owner[0].numel()
    if max_pairs is None or max_pairs >= n_pixels * n_pixels:
        slots = exact_slots(counts, int(counts.max()))  # the one host sync, in the exact-only mode alone
        region_loss = _slot_losses(student_probs, teacher_probs, regions, slots)
    elif sampling == "pixels":
        slots = drawn_slots(counts, math.isqrt(max_pairs), counts * counts <= max_pairs, generator)
        region_loss = _slot_losses(student_probs, teacher_probs, regions, slots)
    else:
        region_loss = _exact_or_pair_losses(student_probs, teacher_probs, regions, max_pairs, generator)
    nonempty = counts > 0
    region_loss = torch.where(nonempty, region_loss, torch.zeros_like(region_loss))
    return region_loss.sum() / nonempty.sum().clamp_min(1).float()


def _slot_losses(student_probs: Tensor, teacher_probs: Tensor, regions: Regions, slots: Slots) -> Tensor:
    """:func:`gram_region_losses` of the maps' vectors at ``slots``: ``(B, N)``."""
    (student,) = read_regions(student_probs, regions, slots.index)
    (teacher,) = read_regions(teacher_probs, regions, slots.index)
    return gram_region_losses(student, teacher, slots)


def _exact_or_pair_losses(
    student_probs: Tensor, teacher_probs: Tensor, regions: Regions, max_pairs: int, generator: Optional[torch.Generator]
) -> Tensor:
    """Eq. 8 for regions with ``|T|^2 <= max_pairs``, else Eq. 9-10 with ``max_pairs`` pairs: ``(B, N)``.

    Each map is read once, at the exact regions' pixels and both pixels of every pair, into one
    gradient map.
    """
    counts = regions.counts
    slots = exact_slots(counts, math.isqrt(max_pairs))  # |T|^2 <= max_pairs bounds an exact region's size
    first, second = pair_draws(counts, max_pairs, generator)
    s_slot, s_first, s_second = read_regions(student_probs, regions, slots.index, first, second)
    t_slot, t_first, t_second = read_regions(teacher_probs, regions, slots.index, first, second)
    return torch.where(
        counts * counts <= max_pairs,
        gram_region_losses(s_slot, t_slot, slots),
        pair_region_losses(s_first, s_second, t_first, t_second),
    )


def _check_scl_args(
    student_probs: Tensor,
    teacher_probs: Tensor,
    owner: Tensor,
    n_boxes: int,
    last_boxes: int,
    max_pairs: Optional[int],
    generator: Optional[torch.Generator],
    sampling: str,
) -> None:
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
        raise ValueError(
            f"sampling='pixels' draws isqrt(max_pairs) >= 2 pixels per region: max_pairs must be >= 4, got {max_pairs}"
        )
    device = student_probs.device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the maps are on {device}")


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

    The classes present around each pixel come from a max-pooled one-hot map of the labels
    (``(B, C, H, W)`` more memory, no host sync).

    Args:
        logits: ``(B, C, H, W)``.
        target: ``(B, H, W)`` class indices in ``[0, C)`` or ``ignore_index``.
    """
    _check_logits_target(logits, target)
    if not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd int >= 1, got {window!r}")
    valid = target != ignore_index
    classes = torch.where(valid, target, 0).long()
    if window == 1:
        # only the pixel's own class is present: the masked logsumexp of Eq. 2 is its
        # log-probability, exactly (max + log(exp(0))), so a gather gives the same loss and gradients
        per_pixel = -F.log_softmax(logits.float(), dim=1).gather(1, classes[:, None]).squeeze(1)
    else:
        per_pixel = _relaxed_nll(logits.float(), classes, valid, window)
    per_pixel = torch.where(valid, per_pixel, torch.zeros_like(per_pixel))
    return per_pixel.sum() / valid.sum().clamp_min(1).float()


def _relaxed_nll(logits: Tensor, classes: Tensor, valid: Tensor, window: int) -> Tensor:
    """``-logsumexp`` of the log-probabilities of the classes present in each pixel's window.

    The classes present around each pixel are a ``window x window`` max-pool of the one-hot
    label map (its -inf padding clips the window at the border). Pixels that are not valid get
    class 0 as present, so that their (discarded) term and its gradient stay finite.

    Args:
        logits: ``(B, C, H, W)`` float32.
        classes: ``(B, H, W)`` class indices (any class where ``valid`` is False).
        valid: ``(B, H, W)`` bool, the pixels that bring their class to the windows around them.
    Returns:
        ``(B, H, W)``.
    """
    channels = logits.shape[1]
    one_hot = F.one_hot(classes, channels).permute(0, 3, 1, 2).to(logits.dtype) * valid[:, None].to(logits.dtype)
    present = F.max_pool2d(one_hot, window, stride=1, padding=window // 2) > 0
    present[:, 0] |= ~valid
    log_probs = F.log_softmax(logits, dim=1)
    return -torch.logsumexp(log_probs.masked_fill(~present, float("-inf")), dim=1)


def pseudo_label_loss(student_logits: Tensor, teacher_logits: Tensor, ignore_mask: Optional[Tensor] = None, *,
                      threshold: float = 0.95) -> Tensor:
    """The unlabeled loss of FixMatch and UniMatch: cross-entropy to the teacher's hard labels where
    the teacher is confident, over the pixels that are not padding.

    With ``conf, label = softmax(teacher_logits).max(1)`` and ``valid = ignore_mask != 255``
    (every pixel when ``ignore_mask`` is None)::

        sum(CE(student_logits, label) * (conf >= threshold) * valid) / count(valid)

    (0, in the graph, when no pixel is valid). The teacher's maps come already mixed as the
    student's images were (labels, confidences and ignore map share one CutMix box).

    Args:
        student_logits: ``(B, C, H, W)``.
        teacher_logits: ``(B, C, H, W)``, computed under ``torch.no_grad``.
        ignore_mask: ``(B, H, W)``, 255 where a pixel is padding.
    """
    _check_prob_pair(student_logits, teacher_logits)
    conf, label = teacher_logits.float().softmax(dim=1).max(dim=1)
    valid = None if ignore_mask is None else ignore_mask != 255
    return masked_pseudo_label_loss(student_logits, label, conf >= threshold, valid)


def masked_pseudo_label_loss(student_logits: Tensor, label: Tensor, confident: Tensor,
                             valid: Optional[Tensor] = None) -> Tensor:
    """:func:`pseudo_label_loss` from the teacher's labels ``(B, H, W)`` and its confidence mask
    ``(B, H, W)`` bool (the methods keep the teacher's probabilities for other terms)."""
    per_pixel = F.cross_entropy(student_logits.float(), label, reduction="none")
    keep = confident if valid is None else confident & valid
    count = per_pixel.new_tensor(float(label.numel())) if valid is None else valid.sum().clamp_min(1).float()
    return (per_pixel * keep).sum() / count


def ohem_cross_entropy(logits: Tensor, target: Tensor, *, threshold: float = 0.7, min_kept: int = 200000,
                       ignore_index: int = 255) -> Tensor:
    """Online hard example mining cross-entropy: UniMatch's ``ProbOhemCrossEntropy2d`` (TorchSemiSeg's).

    With ``p_i`` the softmax probability of pixel i's own class: when ``min_kept > 0`` and there
    are at least ``min_kept`` valid pixels, only the pixels with ``p_i <= t`` count, where ``t`` is
    ``threshold``, or the ``min_kept``-th smallest ``p_i`` (over all pixels, ignored ones at 1)
    when that is larger; otherwise every valid pixel counts (the reference's ``min_kept = 0``
    mines nothing). The loss is the mean
    cross-entropy over the pixels that count.

    Args:
        logits: ``(B, C, H, W)``.
        target: ``(B, H, W)`` class indices in ``[0, C)`` or ``ignore_index``.
    """
    _check_logits_target(logits, target)
    flat = target.reshape(-1).long()
    valid = flat != ignore_index
    if min_kept > 0:
        with torch.no_grad():  # which pixels count; decided on the device, without reading it on the host
            probs = logits.detach().float().softmax(dim=1).transpose(0, 1).reshape(logits.shape[1], -1)
            own = probs.gather(0, torch.where(valid, flat, 0)[None])[0].masked_fill(~valid, 1.0)
            kth = own.kthvalue(min(own.numel(), min_kept)).values
            mines = valid.sum() >= min_kept
            valid = valid & (~mines | (own <= torch.clamp(kth, min=float(threshold))))
    kept = flat.masked_fill(~valid, ignore_index).view_as(target)
    return F.cross_entropy(logits.float(), kept, ignore_index=ignore_index)
