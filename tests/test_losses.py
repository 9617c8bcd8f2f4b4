"""The three losses (and the dense Eq. 6 reference) against brute-force float64 loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sclseg.cutmix import BoxMaskGenerator, box_owner_map
from sclseg.losses import (
    consistency_loss,
    dense_structured_consistency_loss,
    drawn_slots,
    exact_slots,
    gram_region_losses,
    group_regions,
    pair_draws,
    pair_region_losses,
    read_regions,
    relaxed_boundary_loss,
    structured_consistency_loss,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def probs(shape, seed: int, sharpness: float = 2.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen(seed)) * sharpness).softmax(dim=1)


# ----------------------------------------------------------------------------- references


def ref_consistency(s, t, mask=None) -> float:
    S, T = s.double().tolist(), t.double().tolist()
    M = None if mask is None else mask.double().tolist()
    B, C, H, W = s.shape
    total = weight = 0.0
    for b in range(B):
        for y in range(H):
            for x in range(W):
                w = 1.0 if M is None else M[b][y][x]
                d = sum((S[b][c][y][x] - T[b][c][y][x]) ** 2 for c in range(C))
                total += w * d
                weight += w
    return total / weight


def ref_cos(u, v) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def ref_region_losses(s, t, owner, n_boxes: int, last_boxes: int) -> dict:
    """{(b, n): mean over all ordered pairs of T x T (diagonal included)} for non-empty regions."""
    S, T, owners = s.double().tolist(), t.double().tolist(), owner.tolist()
    B, C, H, W = s.shape
    out = {}
    for b in range(B):
        for n in range(n_boxes - last_boxes, n_boxes):
            pix = [(y, x) for y in range(H) for x in range(W) if owners[b][y][x] == n]
            if not pix:
                continue
            sv = [[S[b][c][y][x] for c in range(C)] for y, x in pix]
            tv = [[T[b][c][y][x] for c in range(C)] for y, x in pix]
            total = 0.0
            for i in range(len(pix)):
                for j in range(len(pix)):
                    total += (ref_cos(sv[i], sv[j]) - ref_cos(tv[i], tv[j])) ** 2
            out[(b, n)] = total / len(pix) ** 2
    return out


def ref_scl(s, t, owner, n_boxes: int, last_boxes: int) -> float:
    regions = ref_region_losses(s, t, owner, n_boxes, last_boxes)
    return sum(regions.values()) / len(regions) if regions else 0.0


def ref_scl_torch(s, t, owner, n_boxes: int, last_boxes: int) -> torch.Tensor:
    """Differentiable float64 reference: explicit |T| x |T| cosine matrices, one region at a time."""
    losses = []
    for b in range(s.shape[0]):
        for n in range(n_boxes - last_boxes, n_boxes):
            m = owner[b] == n
            if not m.any():
                continue
            q, r = s[b][:, m].double().T, t[b][:, m].double().T  # (|T|, C)
            q = q / q.norm(dim=1, keepdim=True)
            r = r / r.norm(dim=1, keepdim=True)
            losses.append((q @ q.T - r @ r.T).pow(2).mean())
    return torch.stack(losses).mean()


def ref_dense(s, t) -> float:
    S, T = s.double().tolist(), t.double().tolist()
    B, C, H, W = s.shape
    pix = [(y, x) for y in range(H) for x in range(W)]
    per_image = []
    for b in range(B):
        total = 0.0
        for yi, xi in pix:
            for yj, xj in pix:
                a_s = ref_cos([S[b][c][yi][xi] for c in range(C)], [S[b][c][yj][xj] for c in range(C)])
                a_t = ref_cos([T[b][c][yi][xi] for c in range(C)], [T[b][c][yj][xj] for c in range(C)])
                total += (a_s - a_t) ** 2
        per_image.append(total / len(pix) ** 2)
    return sum(per_image) / B


def lse(values) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def window_classes(target, window: int, ignore_index: int):
    """Per pixel: the set of non-ignore classes in its window (clipped at the border)."""
    tg = target.tolist()
    B, H, W = target.shape
    r = window // 2
    return [
        [
            [
                {
                    tg[b][yy][xx]
                    for yy in range(max(0, y - r), min(H, y + r + 1))
                    for xx in range(max(0, x - r), min(W, x + r + 1))
                    if tg[b][yy][xx] != ignore_index
                }
                for x in range(W)
            ]
            for y in range(H)
        ]
        for b in range(B)
    ]


def ref_relaxed(logits, target, window: int, ignore_index: int = 255) -> float:
    L, tg = logits.double().tolist(), target.tolist()
    B, C, H, W = logits.shape
    sets = window_classes(target, window, ignore_index)
    total, count = 0.0, 0
    for b in range(B):
        for y in range(H):
            for x in range(W):
                if tg[b][y][x] == ignore_index:
                    continue
                v = [L[b][c][y][x] for c in range(C)]
                total += lse(v) - lse([v[c] for c in sets[b][y][x]])  # -log(sum of softmax probs)
                count += 1
    return total / count


def ref_relaxed_torch(logits, target, window: int, ignore_index: int = 255) -> torch.Tensor:
    """Differentiable float64 reference with the class sets built by loops."""
    B, C, H, W = logits.shape
    sets = window_classes(target, window, ignore_index)
    allowed = torch.zeros(B, C, H, W, dtype=torch.bool)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                for c in sets[b][y][x]:
                    allowed[b, c, y, x] = True
    x = logits.double()
    valid = target != ignore_index
    per_pixel = torch.logsumexp(x, 1) - torch.logsumexp(x.masked_fill(~allowed, -math.inf), 1)
    return per_pixel[valid].mean()


# ----------------------------------------------------------------------------- consistency_loss


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 7, 3, 3)])
def test_consistency_matches_loop(shape):
    s, t = probs(shape, 0), probs(shape, 1)
    out = consistency_loss(s, t)
    assert out.shape == () and out.dtype == torch.float32
    assert out.item() == pytest.approx(ref_consistency(s, t), rel=1e-5, abs=1e-7)


def test_consistency_with_bool_mask_matches_loop():
    s, t = probs((2, 3, 5, 6), 2), probs((2, 3, 5, 6), 3)
    mask = torch.rand(2, 5, 6, generator=gen(4)) > 0.4
    out = consistency_loss(s, t, mask)
    assert out.item() == pytest.approx(ref_consistency(s, t, mask), rel=1e-5, abs=1e-7)
    # differs from the unmasked mean: the mask is really used
    assert abs(out.item() - ref_consistency(s, t)) > 1e-4


@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_consistency_with_float_mask_is_weighted_mean(scale):
    s, t = probs((2, 3, 4, 4), 5), probs((2, 3, 4, 4), 6)
    mask = torch.rand(2, 4, 4, generator=gen(7)) * scale  # total weight below 1 when scale=0.01
    out = consistency_loss(s, t, mask)
    assert out.item() == pytest.approx(ref_consistency(s, t, mask), rel=1e-5, abs=1e-7)
    # a uniform weight is the plain mean, whatever its value
    uniform = torch.full((2, 4, 4), 0.01)
    assert consistency_loss(s, t, uniform).item() == pytest.approx(ref_consistency(s, t), rel=1e-5)


def test_consistency_empty_mask_is_zero_not_nan():
    s = probs((1, 3, 4, 4), 8).requires_grad_()
    out = consistency_loss(s, probs((1, 3, 4, 4), 9), torch.zeros(1, 4, 4, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(s.grad).all()


def test_consistency_gradient():
    s = probs((2, 3, 4, 5), 10).requires_grad_()
    t = probs((2, 3, 4, 5), 11)
    consistency_loss(s, t).backward()
    expected = 2.0 * (s.detach().double() - t.double()) / (2 * 4 * 5)
    assert torch.allclose(s.grad.double(), expected, atol=1e-7)
    assert s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- structured_consistency_loss


def _case(seed: int, shape=(2, 3, 6, 6), n_boxes=6):
    """Student/teacher maps and a random owner map with values in [-1, n_boxes)."""
    B, _, H, W = shape
    s, t = probs(shape, seed), probs(shape, seed + 100)
    owner = torch.randint(-1, n_boxes, (B, H, W), generator=gen(seed + 200))
    return s, t, owner


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n_boxes, last_boxes", [(6, 2), (6, 6), (3, 1)])
@pytest.mark.parametrize("max_pairs", [None, 36 * 36, 10**9])
def test_scl_exact_matches_loop_random_owner(seed, n_boxes, last_boxes, max_pairs):
    s, t, owner = _case(seed, n_boxes=n_boxes)
    out = structured_consistency_loss(s, t, owner, n_boxes=n_boxes, last_boxes=last_boxes, max_pairs=max_pairs)
    assert out.shape == () and out.dtype == torch.float32
    assert out.item() == pytest.approx(ref_scl(s, t, owner, n_boxes, last_boxes), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_scl_exact_matches_loop_cutmix_owner(seed):
    n_boxes, last_boxes = 16, 8
    owner = BoxMaskGenerator(n_boxes=n_boxes)(2, 8, 7, gen(seed))
    s, t = probs((2, 4, 8, 7), seed + 1), probs((2, 4, 8, 7), seed + 2)
    expected = ref_scl(s, t, owner, n_boxes, last_boxes)
    largest = max(int((owner[b] == n).sum()) for b in range(2) for n in range(n_boxes))
    # None, a bound above every region but below HW^2 (the sampled code path), exactly the largest |T|^2
    for max_pairs in (None, (8 * 7) ** 2 - 1, max(largest**2, 1)):
        out = structured_consistency_loss(
            s, t, owner, n_boxes=n_boxes, last_boxes=last_boxes, max_pairs=max_pairs, generator=gen(seed)
        )
        assert out.item() == pytest.approx(expected, rel=1e-4, abs=1e-6), max_pairs


def test_scl_diagonal_included_and_cosine():
    # one region of two pixels: 4 ordered pairs, 2 diagonal (gap 0) and 2 off-diagonal
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # orthogonal: cos 0
    t = torch.tensor([[2.0, 0.0], [3.0, 0.0]]).T.reshape(1, 2, 1, 2)  # parallel, unnormalised: cos 1
    owner = torch.zeros(1, 1, 2, dtype=torch.long)
    out = structured_consistency_loss(s, t, owner, n_boxes=1, last_boxes=1, max_pairs=None)
    assert out.item() == pytest.approx(0.5, abs=1e-6)  # (0 + 1 + 1 + 0) / 4
    assert out.item() == pytest.approx(ref_scl(s, t, owner, 1, 1), abs=1e-6)


@pytest.mark.parametrize("max_pairs", [None, 4])
def test_scl_only_last_boxes_counted(max_pairs):
    n_boxes, last_boxes = 6, 2
    s, t, owner = _case(7, n_boxes=n_boxes)
    kw = dict(n_boxes=n_boxes, last_boxes=last_boxes, max_pairs=max_pairs)
    base = structured_consistency_loss(s, t, owner, generator=gen(0), **kw)
    if max_pairs is None:
        assert base.item() == pytest.approx(ref_scl(s, t, owner, n_boxes, last_boxes), rel=1e-4, abs=1e-6)
    # change both maps wherever the owner is an early box or no box: same loss (same draws)
    early = (owner < n_boxes - last_boxes)[:, None].expand_as(s)
    s2 = torch.where(early, probs(s.shape, 50), s)
    t2 = torch.where(early, probs(s.shape, 51), t)
    assert torch.equal(structured_consistency_loss(s2, t2, owner, generator=gen(0), **kw), base)
    # changing a counted region does change it
    late = (owner == n_boxes - 1)[:, None].expand_as(s)
    s3 = torch.where(late, probs(s.shape, 52), s)
    assert structured_consistency_loss(s3, t, owner, generator=gen(0), **kw).item() != pytest.approx(base.item())


def test_scl_early_box_overwritten_by_later_box():
    # box 0 (early, not counted) covers the image; box 2 (counted) overwrites the middle
    boxes = torch.tensor([[0, 0, 6, 6], [0, 0, 0, 0], [2, 1, 5, 4]])
    owner = box_owner_map(boxes, 6, 6)[None]
    s, t = probs((1, 3, 6, 6), 60), probs((1, 3, 6, 6), 61)
    kw = dict(n_boxes=3, last_boxes=1, max_pairs=None)
    base = structured_consistency_loss(s, t, owner, **kw)
    assert base.item() == pytest.approx(ref_scl(s, t, owner, 3, 1), rel=1e-4, abs=1e-6)
    inside_box0_only = (owner == 0)[:, None].expand_as(s)
    s2 = torch.where(inside_box0_only, probs(s.shape, 62), s)
    assert structured_consistency_loss(s2, t, owner, **kw).item() == pytest.approx(base.item(), abs=1e-7)


def test_scl_empty_regions_skipped():
    n_boxes, last_boxes = 4, 3
    s, t = probs((2, 3, 5, 5), 70), probs((2, 3, 5, 5), 71)
    owner = torch.full((2, 5, 5), -1, dtype=torch.long)
    owner[0, :2, :3] = 3  # image 0: only box 3 present
    owner[0, 3:, :] = 0  # (not counted)
    owner[1, :, :2] = 1  # image 1: boxes 1 and 2, box 3 empty
    owner[1, 1:4, 3:] = 2
    regions = ref_region_losses(s, t, owner, n_boxes, last_boxes)
    assert set(regions) == {(0, 3), (1, 1), (1, 2)}
    expected = sum(regions.values()) / 3
    for max_pairs in (None, 10**6):
        out = structured_consistency_loss(s, t, owner, n_boxes=n_boxes, last_boxes=last_boxes, max_pairs=max_pairs)
        assert out.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
        # not the mean over all B * last_boxes = 6 slots
        assert abs(out.item() - sum(regions.values()) / 6) > 1e-4


@pytest.mark.parametrize("max_pairs", [None, 3, 9000])
@pytest.mark.parametrize("fill", [-1, 0])  # no box at all, or only early (uncounted) boxes
def test_scl_all_regions_empty_is_zero_and_differentiable(max_pairs, fill):
    s = probs((2, 3, 4, 4), 80).requires_grad_()
    t = probs((2, 3, 4, 4), 81)
    owner = torch.full((2, 4, 4), fill, dtype=torch.long)
    out = structured_consistency_loss(s, t, owner, n_boxes=8, last_boxes=4, max_pairs=max_pairs)
    assert out.item() == 0.0
    assert out.requires_grad
    out.backward()
    assert s.grad is not None and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("sampling", ["pairs", "pixels"])
def test_scl_sampled_mean_converges_to_exact(sampling):
    # region 0 (box 2): 2 pixels, 4 pairs <= max_pairs -> exact; region 1 (box 3): 10 pixels,
    # 100 pairs > max_pairs -> estimated from 5 random pairs
    n_boxes, last_boxes, max_pairs = 4, 2, 5
    s, t = probs((1, 3, 4, 4), 90, sharpness=3.0), probs((1, 3, 4, 4), 91, sharpness=3.0)
    owner = torch.full((1, 4, 4), -1, dtype=torch.long)
    owner[0, 0, :2] = 2
    owner[0, 1:, 1:] = 3
    owner[0, 2, 2] = 1  # early box: not counted, so region 1 has 8 pixels
    exact = ref_scl(s, t, owner, n_boxes, last_boxes)
    g = gen(1234)
    draws = 3000
    values = torch.tensor(
        [
            structured_consistency_loss(
                s, t, owner, n_boxes=n_boxes, last_boxes=last_boxes, max_pairs=max_pairs, generator=g, sampling=sampling
            ).item()
            for _ in range(draws)
        ],
        dtype=torch.float64,
    )
    se = values.std().item() / math.sqrt(draws)
    assert se > 0  # it really samples
    assert abs(values.mean().item() - exact) < 4.5 * se + 1e-6, (values.mean().item(), exact, se)
    # the same seed gives the same estimate
    kw = dict(n_boxes=n_boxes, last_boxes=last_boxes, max_pairs=max_pairs, sampling=sampling)
    a = structured_consistency_loss(s, t, owner, generator=gen(5), **kw)
    assert torch.equal(a, structured_consistency_loss(s, t, owner, generator=gen(5), **kw))


@pytest.mark.parametrize("sampling", ["pairs", "pixels"])
def test_scl_sampled_mode_many_regions_unbiased(sampling):
    # a realistic owner map with several sampled regions at once, B = 2
    n_boxes, last_boxes, max_pairs = 8, 4, 6
    owner = BoxMaskGenerator(n_boxes=n_boxes)(2, 6, 6, gen(3))
    s, t = probs((2, 3, 6, 6), 92, 3.0), probs((2, 3, 6, 6), 93, 3.0)
    exact = ref_scl(s, t, owner, n_boxes, last_boxes)
    assert exact > 0
    g = gen(99)
    values = torch.tensor(
        [
            structured_consistency_loss(
                s, t, owner, n_boxes=n_boxes, last_boxes=last_boxes, max_pairs=max_pairs, generator=g, sampling=sampling
            ).item()
            for _ in range(1500)
        ],
        dtype=torch.float64,
    )
    se = values.std().item() / math.sqrt(values.numel())
    assert se > 0
    assert abs(values.mean().item() - exact) < 4.5 * se + 1e-6, (values.mean().item(), exact, se)


@pytest.mark.parametrize("sampling", ["pairs", "pixels"])
def test_scl_small_regions_exact_in_sampled_mode(sampling):
    # every counted region has |T| <= 3, so |T|^2 <= max_pairs = 9 < HW^2: exact, seed-independent
    s, t = probs((2, 3, 6, 6), 94), probs((2, 3, 6, 6), 95)
    owner = torch.full((2, 6, 6), -1, dtype=torch.long)
    owner[0, 0, :3] = 5
    owner[0, 2, 1:3] = 6
    owner[0, 3:, :] = 1  # early box, large, not counted
    owner[1, 4, 3:6] = 7
    owner[1, 5, 0] = 4
    expected = ref_scl(s, t, owner, 8, 4)
    values = [
        structured_consistency_loss(s, t, owner, n_boxes=8, last_boxes=4, max_pairs=9, generator=gen(k),
                                    sampling=sampling).item()
        for k in range(6)
    ]
    for v in values:
        assert v == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert max(values) - min(values) < 1e-6


@pytest.mark.parametrize("sampling", ["pairs", "pixels"])
def test_scl_mixed_exact_and_sampled_regions(sampling):
    # region A: 3 pixels (|T|^2 = 9 = max_pairs) -> exact; region B: 4 pixels (16 > 9) -> sampled,
    # but student == teacher inside B, so every sampled gap is 0; the loss is exact_A / 2 for any seed
    s, t = probs((1, 3, 5, 5), 96), probs((1, 3, 5, 5), 97)
    owner = torch.full((1, 5, 5), -1, dtype=torch.long)
    owner[0, 0, :3] = 0
    owner[0, 3:, 3:] = 1
    t = torch.where((owner == 1)[:, None].expand_as(s), s, t)
    regions = ref_region_losses(s, t, owner, 2, 2)
    assert regions[(0, 1)] == pytest.approx(0.0, abs=1e-12) and regions[(0, 0)] > 1e-3
    for k in range(4):
        out = structured_consistency_loss(s, t, owner, n_boxes=2, last_boxes=2, max_pairs=9, generator=gen(k),
                                          sampling=sampling)
        assert out.item() == pytest.approx(regions[(0, 0)] / 2, rel=1e-4, abs=1e-6)
    # with max_pairs = 8, region A (9 pairs > 8) is sampled too and the loss varies with the seed
    vals = {
        structured_consistency_loss(s, t, owner, n_boxes=2, last_boxes=2, max_pairs=8, generator=gen(k),
                                    sampling=sampling).item()
        for k in range(6)
    }
    assert len(vals) > 1


@pytest.mark.parametrize("max_pairs, sampling", [(None, "pairs"), (20, "pairs"), (20, "pixels")])
def test_scl_gradients_reach_student(max_pairs, sampling):
    n_boxes, last_boxes = 8, 4
    owner = BoxMaskGenerator(n_boxes=n_boxes)(2, 6, 7, gen(4))
    s = probs((2, 3, 6, 7), 110).requires_grad_()
    t = probs((2, 3, 6, 7), 111)
    out = structured_consistency_loss(s, t, owner, n_boxes=n_boxes, last_boxes=last_boxes, max_pairs=max_pairs,
                                      generator=gen(0), sampling=sampling)
    out.backward()
    assert torch.isfinite(s.grad).all()
    counted = (owner >= n_boxes - last_boxes)[:, None].expand_as(s)
    assert s.grad[counted].abs().sum() > 0
    assert torch.equal(s.grad[~counted], torch.zeros_like(s.grad[~counted]))
    if max_pairs is None:  # exact: the gradient equals the float64 reference's
        s64 = s.detach().double().requires_grad_()
        ref_scl_torch(s64, t, owner, n_boxes, last_boxes).backward()
        assert torch.allclose(s.grad.double(), s64.grad, rtol=1e-3, atol=1e-6)


def test_scl_teacher_gradient_when_not_detached():
    # the loss does not detach its inputs: a teacher that requires grad gets one
    owner = torch.zeros(1, 4, 4, dtype=torch.long)
    s = probs((1, 3, 4, 4), 112)
    t = probs((1, 3, 4, 4), 113).requires_grad_()
    structured_consistency_loss(s, t, owner, n_boxes=1, last_boxes=1, max_pairs=None).backward()
    assert t.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- SCL pieces, one at a time


def state_after_drawing(seed: int, shape) -> torch.Tensor:
    """The state of a fresh generator after one float64 ``torch.rand(shape)``."""
    g = gen(seed)
    torch.rand(shape, generator=g, dtype=torch.float64)
    return g.get_state()


def test_group_regions_lists_each_region_in_raster_order():
    owner = torch.randint(-1, 6, (2, 5, 7), generator=gen(300))
    regions = group_regions(owner, n_boxes=6, last_boxes=3)
    for b in range(2):
        start = 0
        for n in range(3):
            expected = [p for p in range(35) if owner[b].reshape(-1)[p] == 3 + n]
            assert regions.counts[b, n] == len(expected) and regions.offsets[b, n] == start
            assert regions.order[b, start : start + len(expected)].tolist() == expected
            start += len(expected)
        # then every pixel of no counted box, also in raster order
        assert regions.order[b, start:].tolist() == [p for p in range(35) if owner[b].reshape(-1)[p] < 3]


def _reads_per_pixel(owner: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``(B, HW)`` how often region-local indices ``local (B, N, S)`` read each pixel (a loop)."""
    batch, regions, samples = local.shape
    flat = owner.reshape(batch, -1)
    hits = torch.zeros(flat.shape)
    for b in range(batch):
        for n in range(regions):
            pix = [p for p in range(flat.shape[1]) if flat[b, p] == n]
            for k in range(samples):
                hits[b, pix[local[b, n, k]]] += 1
    return hits


def test_read_regions_reads_the_region_pixels_and_sums_gradients_into_one_map():
    owner = torch.randint(0, 2, (2, 4, 5), generator=gen(301))
    regions = group_regions(owner, n_boxes=2, last_boxes=2)
    s = probs((2, 3, 4, 5), 302).requires_grad_()
    first = torch.randint(0, 3, (2, 2, 4), generator=gen(303)).minimum(regions.counts[..., None] - 1)
    second = torch.zeros(2, 2, 1, dtype=torch.long)
    a, b2 = read_regions(s, regions, first, second)
    assert a.shape == (2, 3, 2, 4) and b2.shape == (2, 3, 2, 1) and a.dtype == torch.float32
    for b in range(2):
        for n in range(2):
            pix = [p for p in range(20) if owner[b].reshape(-1)[p] == n]
            for k in range(4):
                assert torch.equal(a[b, :, n, k], s[b].reshape(3, -1)[:, pix[first[b, n, k]]])
            assert torch.equal(b2[b, :, n, 0], s[b].reshape(3, -1)[:, pix[0]])
    (a.sum() + 2 * b2.sum()).backward()
    hits = _reads_per_pixel(owner, first) + 2 * _reads_per_pixel(owner, second)
    assert torch.equal(s.grad, hits.view(2, 1, 4, 5).expand(2, 3, 4, 5))


def test_read_regions_gradient_of_a_part_left_out_of_the_loss_is_zero():
    owner = torch.randint(0, 2, (2, 4, 5), generator=gen(311))
    regions = group_regions(owner, n_boxes=2, last_boxes=2)
    s = probs((2, 3, 4, 5), 312).requires_grad_()
    first = torch.randint(0, 2, (2, 2, 3), generator=gen(313)).minimum(regions.counts[..., None] - 1)
    second = torch.randint(0, 2, (2, 2, 3), generator=gen(314)).minimum(regions.counts[..., None] - 1)
    a, _ = read_regions(s, regions, first, second)  # the second part is read and never used
    (3.0 * a).sum().backward()
    hits = 3 * _reads_per_pixel(owner, first)
    assert torch.equal(s.grad, hits.view(2, 1, 4, 5).expand(2, 3, 4, 5))


@pytest.mark.parametrize("seed", range(3))
def test_gram_region_losses_equal_the_pair_loop(seed):
    # 2 images x 3 regions, 5 slots each, some unused; divisor = |used|^2 (the exact loss)
    s, t = probs((2, 4, 3, 5), seed + 310), probs((2, 4, 3, 5), seed + 311)
    used = torch.rand(2, 3, 5, generator=gen(seed + 312)) > 0.3
    used[0, 0] = False  # an empty region: 0
    slots = exact_slots(used.sum(-1), 5)._replace(used=used)
    out = gram_region_losses(s, t, slots)
    for b in range(2):
        for n in range(3):
            idx = [p for p in range(5) if used[b, n, p]]
            sv, tv = s[b, :, n].T.double().tolist(), t[b, :, n].T.double().tolist()
            total = sum((ref_cos(sv[i], sv[j]) - ref_cos(tv[i], tv[j])) ** 2 for i in idx for j in idx)
            assert out[b, n].item() == pytest.approx(total / max(len(idx) ** 2, 1), rel=1e-5, abs=1e-7)


def test_exact_slots_cover_each_region_once():
    counts = torch.tensor([[0, 2, 5], [3, 1, 4]])
    slots = exact_slots(counts, 4)
    assert slots.index.shape == (2, 3, 4) and slots.index[1, 2].tolist() == [0, 1, 2, 3]
    assert slots.used.sum(-1).tolist() == [[0, 2, 4], [3, 1, 4]]  # a region above the width is cut
    assert slots.n_pairs.tolist() == [[0, 4, 25], [9, 1, 16]]


def test_drawn_slots_draw_k_pixels_where_not_exact():
    counts = torch.tensor([[2, 40, 0], [3, 7, 100]])
    exact = counts * counts <= 9
    g = gen(320)
    slots = drawn_slots(counts, 3, exact, g)
    # exactly B * N * k float64 numbers, in that layout
    u = torch.rand((2, 3, 3), generator=gen(320), dtype=torch.float64)
    assert torch.equal(g.get_state(), state_after_drawing(320, (2, 3, 3)))
    drawn = (u * counts.clamp_min(1)[..., None]).long()
    assert torch.equal(slots.index[~exact], drawn[~exact])
    assert slots.index[0, 0].tolist() == [0, 1, 2] and slots.index[1, 0].tolist() == [0, 1, 2]
    assert slots.used[0, 0].tolist() == [True, True, False] and slots.used[0, 1].all() and not slots.used[0, 2].any()
    assert slots.n_pairs.tolist() == [[4, 6, 0], [9, 6, 6]]  # |T|^2 if exact (0 if empty), else k (k - 1)


def test_pair_draws_are_iid_uniform_pairs():
    counts = torch.tensor([[3, 1]])
    g = gen(330)
    first, second = pair_draws(counts, 9000, g)
    assert first.shape == second.shape == (1, 2, 9000)
    assert torch.equal(g.get_state(), state_after_drawing(330, (1, 2, 18000)))
    assert int(first[0, 1].max()) == 0 and int(second[0, 1].max()) == 0
    # the 9 ordered pairs of a 3-pixel region, each with probability 1/9 (binomial sd ~ 31)
    freq = torch.bincount(first[0, 0] * 3 + second[0, 0], minlength=9)
    assert (freq - 1000).abs().max() < 5 * math.sqrt(9000 * (1 / 9) * (8 / 9))


def test_pair_region_losses_equal_the_loop_and_gradcheck():
    s1, s2 = probs((2, 3, 2, 6), 340), probs((2, 3, 2, 6), 341)
    t1, t2 = probs((2, 3, 2, 6), 342), probs((2, 3, 2, 6), 343)
    out = pair_region_losses(s1, s2, t1, t2)
    for b in range(2):
        for n in range(2):
            gaps = [
                ref_cos(s1[b, :, n, m].tolist(), s2[b, :, n, m].tolist())
                - ref_cos(t1[b, :, n, m].tolist(), t2[b, :, n, m].tolist())
                for m in range(6)
            ]
            assert out[b, n].item() == pytest.approx(sum(g * g for g in gaps) / 6, rel=1e-5, abs=1e-8)
    # the written-out backward pass, in float64 against finite differences (both student and teacher)
    args = [x.double().requires_grad_() for x in (s1, s2, t1, t2)]
    assert torch.autograd.gradcheck(lambda *a: pair_region_losses(*a), args)
    # a pair with a zero vector: eps guards the cosine, the gradient stays finite
    z1 = s1.double().clone()
    z1[0, :, 0, 0] = 0
    z1.requires_grad_()
    pair_region_losses(z1, s2.double(), t1.double(), t2.double()).sum().backward()
    assert torch.isfinite(z1.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scl_sampled_modes_low_precision(dtype):
    owner = BoxMaskGenerator(n_boxes=8)(2, 12, 12, gen(350))
    s = probs((2, 4, 12, 12), 351).to(dtype).requires_grad_()
    t = probs((2, 4, 12, 12), 352).to(dtype)
    for sampling in ("pairs", "pixels"):
        s.grad = None
        kw = dict(n_boxes=8, last_boxes=4, max_pairs=16, sampling=sampling)
        out = structured_consistency_loss(s, t, owner, generator=gen(353), **kw)
        ref = structured_consistency_loss(s.detach().float(), t.float(), owner, generator=gen(353), **kw)
        assert out.dtype == torch.float32 and out.item() == pytest.approx(ref.item(), rel=1e-6)
        out.backward()
        assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all() and s.grad.float().abs().sum() > 0


def test_relaxed_matches_dense_one_hot_formula_on_blocky_labels():
    # Eq. 2 computed densely (one-hot max-pool presence, masked logsumexp everywhere) at a size
    # with many plain and many mixed windows, ignore pixels and both borders
    B, C, H, W = 2, 6, 24, 40
    coarse = torch.randint(0, C, (B, 1, 6, 10), generator=gen(360))
    target = coarse.repeat_interleave(4, 2).repeat_interleave(4, 3)[:, 0]
    target[torch.rand(B, H, W, generator=gen(361)) < 0.05] = 255
    logits = (torch.randn(B, C, H, W, generator=gen(362)) * 3).requires_grad_()
    for window in (3, 5):
        valid = target != 255
        one_hot = F.one_hot(torch.where(valid, target, 0), C).permute(0, 3, 1, 2).double() * valid[:, None]
        present = (F.max_pool2d(one_hot, window, 1, window // 2) > 0) | ~valid[:, None]
        x = logits.detach().double().requires_grad_()
        lp = F.log_softmax(x, 1)
        ref = -torch.logsumexp(lp.masked_fill(~present, -math.inf), 1)[valid].mean()
        ref.backward()
        logits.grad = None
        out = relaxed_boundary_loss(logits, target, window=window)
        out.backward()
        assert out.item() == pytest.approx(ref.item(), rel=1e-6)
        assert torch.allclose(logits.grad.double(), x.grad, rtol=1e-4, atol=1e-8)


def test_relaxed_window_larger_than_the_image():
    # every window covers the whole 2 x 3 image: each valid pixel's set is all classes present in it
    target = torch.tensor([[[0, 0, 2], [255, 0, 0]]])
    logits = torch.randn(1, 4, 2, 3, generator=gen(370)) * 2
    for window in (5, 9):
        out = relaxed_boundary_loss(logits, target, window=window)
        assert out.item() == pytest.approx(ref_relaxed(logits, target, window), rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------- dense (Eq. 6)


@pytest.mark.parametrize("shape", [(2, 3, 3, 4), (1, 5, 2, 2)])
def test_dense_matches_double_loop(shape):
    s, t = probs(shape, 120), probs(shape, 121)
    out = dense_structured_consistency_loss(s, t)
    assert out.item() == pytest.approx(ref_dense(s, t), rel=1e-4, abs=1e-7)


def test_dense_equals_one_region_covering_the_image():
    s, t = probs((2, 3, 4, 3), 122), probs((2, 3, 4, 3), 123)
    owner = torch.zeros(2, 4, 3, dtype=torch.long)
    scl = structured_consistency_loss(s, t, owner, n_boxes=1, last_boxes=1, max_pairs=None)
    assert scl.item() == pytest.approx(ref_dense(s, t), rel=1e-4, abs=1e-7)


def test_dense_gradient_reaches_student():
    s = probs((1, 3, 3, 3), 124).requires_grad_()
    dense_structured_consistency_loss(s, probs((1, 3, 3, 3), 125)).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- relaxed_boundary_loss


def _seg_case(seed: int, shape=(2, 4, 6, 7), ignore_index=255, ignore_frac=0.2):
    B, C, H, W = shape
    logits = torch.randn(shape, generator=gen(seed)) * 2.0
    target = torch.randint(0, C, (B, H, W), generator=gen(seed + 1))
    ignore = torch.rand(B, H, W, generator=gen(seed + 2)) < ignore_frac
    target[ignore] = ignore_index
    return logits, target


@pytest.mark.parametrize("ignore_index", [255, -1])
@pytest.mark.parametrize("seed", range(3))
def test_relaxed_window1_equals_cross_entropy(seed, ignore_index):
    logits, target = _seg_case(seed, ignore_index=ignore_index)
    out = relaxed_boundary_loss(logits, target, window=1, ignore_index=ignore_index)
    ce = F.cross_entropy(logits.double(), target, ignore_index=ignore_index)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ce.item(), rel=1e-5)
    assert out.item() == pytest.approx(ref_relaxed(logits, target, 1, ignore_index), rel=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_relaxed_window1_is_bitwise_the_masked_logsumexp_of_eq2(seed):
    """The window=1 shortcut (a gather) against Eq. 2 as the general path computes it."""
    logits, target = _seg_case(seed, shape=(2, 5, 9, 11))
    logits.requires_grad_(True)
    out = relaxed_boundary_loss(logits, target, window=1)
    (grad,) = torch.autograd.grad(out, logits)

    ref_logits = logits.detach().clone().requires_grad_(True)
    valid = target != 255
    present = F.one_hot(torch.where(valid, target, 0), 5).permute(0, 3, 1, 2).bool() | ~valid[:, None]
    log_probs = F.log_softmax(ref_logits, dim=1)
    per_pixel = -torch.logsumexp(log_probs.masked_fill(~present, float("-inf")), dim=1)
    ref = torch.where(valid, per_pixel, torch.zeros_like(per_pixel)).sum() / valid.sum().float()
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert torch.equal(out, ref) and torch.equal(grad, ref_grad)


@pytest.mark.parametrize("window", [1, 3, 5])
@pytest.mark.parametrize("seed", range(3))
def test_relaxed_matches_loop(window, seed):
    logits, target = _seg_case(seed, shape=(2, 4, 6, 7))
    out = relaxed_boundary_loss(logits, target, window=window)
    assert out.item() == pytest.approx(ref_relaxed(logits, target, window), rel=1e-5, abs=1e-6)


def test_relaxed_blocky_target_and_wide_window():
    # piecewise-constant labels (realistic boundaries), window larger than the image on one axis
    target = torch.zeros(1, 5, 9, dtype=torch.long)
    target[0, :, 4:] = 2
    target[0, 3:, 6:] = 1
    target[0, 0, 0] = 255
    logits = torch.randn(1, 3, 5, 9, generator=gen(130)) * 3
    for window in (3, 7, 11):
        out = relaxed_boundary_loss(logits, target, window=window)
        assert out.item() == pytest.approx(ref_relaxed(logits, target, window), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("window", [1, 3])
def test_relaxed_ignored_pixels_excluded(window):
    logits, target = _seg_case(140, ignore_frac=0.4)
    ignored = (target == 255)[:, None].expand_as(logits)
    base = relaxed_boundary_loss(logits, target, window=window)
    changed = torch.where(ignored, torch.randn(logits.shape, generator=gen(141)) * 50, logits)
    assert relaxed_boundary_loss(changed, target, window=window).item() == pytest.approx(base.item(), rel=1e-6)
    # and the value is the mean over the valid pixels of the loop reference
    assert base.item() == pytest.approx(ref_relaxed(logits, target, window), rel=1e-5)


def test_relaxed_all_ignored_is_zero_in_graph():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    out = relaxed_boundary_loss(logits, torch.full((1, 4, 4), 255), window=3)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("window", [1, 3, 5])
@pytest.mark.parametrize("kind", ["minus1e4", "large"])
def test_relaxed_finite_when_softmax_underflows(window, kind):
    B, C, H, W = 1, 3, 5, 5
    target = torch.zeros(B, H, W, dtype=torch.long)
    target[0, :, 3:] = 1
    target[0, 0, 0] = 255
    if kind == "minus1e4":
        logits = torch.zeros(B, C, H, W)
        logits[:, 0] = -1e4  # class 0 has probability exp(-1e4) = 0 in float32
        logits[:, 1, :, 3:] = -1e4
    else:
        logits = torch.randn(B, C, H, W, generator=gen(150)) * 3e3
    logits.requires_grad_()
    out = relaxed_boundary_loss(logits, target, window=window)
    assert torch.isfinite(out)
    assert out.item() == pytest.approx(ref_relaxed(logits.detach(), target, window), rel=1e-5)
    out.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("window", [1, 3, 5])
def test_relaxed_gradient_matches_reference(window):
    logits, target = _seg_case(160, shape=(2, 3, 5, 6))
    logits.requires_grad_()
    relaxed_boundary_loss(logits, target, window=window).backward()
    x64 = logits.detach().double().requires_grad_()
    ref_relaxed_torch(x64, target, window).backward()
    assert logits.grad.abs().sum() > 0
    assert torch.allclose(logits.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_float32(dtype):
    s32, t32 = probs((2, 4, 6, 6), 170), probs((2, 4, 6, 6), 171)
    s, t = s32.to(dtype), t32.to(dtype)
    owner = BoxMaskGenerator(n_boxes=8)(2, 6, 6, gen(172))
    logits32, target = _seg_case(173, shape=(2, 4, 6, 6))
    logits = logits32.to(dtype)

    c = consistency_loss(s, t)
    assert c.dtype == torch.float32
    assert c.item() == pytest.approx(ref_consistency(s.float(), t.float()), rel=1e-5, abs=1e-7)
    assert c.item() == pytest.approx(consistency_loss(s32, t32).item(), rel=5e-2)

    kw = dict(n_boxes=8, last_boxes=4, max_pairs=None)
    sc = structured_consistency_loss(s, t, owner, **kw)
    assert sc.dtype == torch.float32
    assert sc.item() == pytest.approx(ref_scl(s.float(), t.float(), owner, 8, 4), rel=1e-4, abs=1e-6)
    assert sc.item() == pytest.approx(structured_consistency_loss(s32, t32, owner, **kw).item(), rel=5e-2, abs=1e-4)

    r = relaxed_boundary_loss(logits, target, window=3)
    assert r.dtype == torch.float32
    assert r.item() == pytest.approx(ref_relaxed(logits.float(), target, 3), rel=1e-5)
    assert r.item() == pytest.approx(relaxed_boundary_loss(logits32, target, window=3).item(), rel=2e-2)

    # gradients reach low-precision students too
    s_req = s.clone().requires_grad_()
    (consistency_loss(s_req, t) + structured_consistency_loss(s_req, t, owner, **kw)).backward()
    assert s_req.grad.dtype == dtype and torch.isfinite(s_req.grad.float()).all()
    assert s_req.grad.float().abs().sum() > 0


# ----------------------------------------------------------------------------- bad input


P = (2, 3, 4, 4)


def _z(shape, **kw):
    return torch.zeros(shape, **kw)


@pytest.mark.parametrize(
    "s, t, mask, name",
    [
        (_z((3, 4, 4)), _z((3, 4, 4)), None, "student_probs"),
        (_z(P), _z((2, 3, 4, 5)), None, "teacher_probs"),
        (_z(P), _z((2, 2, 4, 4)), None, "teacher_probs"),
        (_z(P), _z(P), _z((2, 4, 5)), "mask"),
        (_z(P), _z(P), _z((2, 1, 4, 4)), "mask"),
        (_z(P), _z(P, device="meta"), None, "teacher_probs"),
        (_z(P), _z(P), _z((2, 4, 4), device="meta"), "mask"),
    ],
)
def test_consistency_bad_input(s, t, mask, name):
    with pytest.raises(ValueError, match=name):
        consistency_loss(s, t, mask)


@pytest.mark.parametrize(
    "s, t, owner, kw, name",
    [
        (_z((3, 4, 4)), _z((3, 4, 4)), _z((3, 4), dtype=torch.long), {}, "student_probs"),
        (_z(P), _z((2, 3, 4, 5)), _z((2, 4, 4), dtype=torch.long), {}, "teacher_probs"),
        (_z(P), _z(P, device="meta"), _z((2, 4, 4), dtype=torch.long), {}, "teacher_probs"),
        (_z(P), _z(P), _z((2, 4, 5), dtype=torch.long), {}, "owner"),
        (_z(P), _z(P), _z((1, 4, 4), dtype=torch.long), {}, "owner"),
        (_z(P), _z(P), _z((2, 4, 4)), {}, "owner"),  # float owner map
        (_z(P), _z(P), _z((2, 4, 4), dtype=torch.bool), {}, "owner"),
        (_z(P), _z(P), _z((2, 4, 4), dtype=torch.long, device="meta"), {}, "owner"),
        (_z(P), _z(P), _z((2, 4, 4), dtype=torch.long), dict(n_boxes=4, last_boxes=8), "last_boxes"),
        (_z(P), _z(P), _z((2, 4, 4), dtype=torch.long), dict(n_boxes=4, last_boxes=0), "last_boxes"),
        (_z(P), _z(P), _z((2, 4, 4), dtype=torch.long), dict(n_boxes=0, last_boxes=1), "n_boxes"),
        (_z(P), _z(P), _z((2, 4, 4), dtype=torch.long), dict(max_pairs=0), "max_pairs"),
        (_z(P), _z(P), _z((2, 4, 4), dtype=torch.long), dict(max_pairs=-5), "max_pairs"),
        (_z(P), _z(P), _z((2, 4, 4), dtype=torch.long), dict(sampling="boxes"), "sampling"),
        (_z(P), _z(P), _z((2, 4, 4), dtype=torch.long), dict(max_pairs=3, sampling="pixels"), "max_pairs"),
    ],
)
def test_scl_bad_input(s, t, owner, kw, name):
    with pytest.raises(ValueError, match=name):
        structured_consistency_loss(s, t, owner, **kw)


def test_dense_bad_input():
    with pytest.raises(ValueError, match="teacher_probs"):
        dense_structured_consistency_loss(_z(P), _z((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="student_probs"):
        dense_structured_consistency_loss(_z((3, 4, 4)), _z((3, 4, 4)))


@pytest.mark.parametrize(
    "logits, target, kw, name",
    [
        (_z((3, 4, 4)), _z((3, 4, 4), dtype=torch.long), {}, "logits"),
        (_z(P), _z((2, 4, 5), dtype=torch.long), {}, "target"),
        (_z(P), _z((2, 3, 4, 4), dtype=torch.long), {}, "target"),
        (_z(P), _z((2, 4, 4)), {}, "target"),  # float target
        (_z(P), _z((2, 4, 4), dtype=torch.long, device="meta"), {}, "target"),
        (_z(P), _z((2, 4, 4), dtype=torch.long), dict(window=2), "window"),
        (_z(P), _z((2, 4, 4), dtype=torch.long), dict(window=4), "window"),
        (_z(P), _z((2, 4, 4), dtype=torch.long), dict(window=0), "window"),
        (_z(P), _z((2, 4, 4), dtype=torch.long), dict(window=-1), "window"),
    ],
)
def test_relaxed_bad_input(logits, target, kw, name):
    with pytest.raises(ValueError, match=name):
        relaxed_boundary_loss(logits, target, **kw)


# ----------------------------------------------------------------------------- CUDA


@needs_cuda
def test_cuda_losses_match_references():
    s, t = probs((2, 3, 6, 6), 180), probs((2, 3, 6, 6), 181)
    owner = BoxMaskGenerator(n_boxes=8)(2, 6, 6, gen(182))
    cs, ct, co = s.cuda(), t.cuda(), owner.cuda()
    assert consistency_loss(cs, ct).item() == pytest.approx(ref_consistency(s, t), rel=1e-5)
    for max_pairs in (None, 35 * 35):
        out = structured_consistency_loss(cs, ct, co, n_boxes=8, last_boxes=4, max_pairs=max_pairs,
                                          generator=gen(0, "cuda"))
        assert out.device.type == "cuda"
        assert out.item() == pytest.approx(ref_scl(s, t, owner, 8, 4), rel=1e-4, abs=1e-6)
    logits, target = _seg_case(183)
    for window in (1, 3, 5):
        out = relaxed_boundary_loss(logits.cuda(), target.cuda(), window=window)
        assert out.item() == pytest.approx(ref_relaxed(logits, target, window), rel=1e-5, abs=1e-6)


@needs_cuda
def test_cuda_sampled_and_bf16_and_device_errors():
    s = probs((2, 3, 6, 6), 184).cuda().bfloat16().requires_grad_()
    t = probs((2, 3, 6, 6), 185).cuda().bfloat16()
    owner = BoxMaskGenerator(n_boxes=8)(2, 6, 6, gen(186, "cuda"))
    out = structured_consistency_loss(s, t, owner, n_boxes=8, last_boxes=4, max_pairs=4, generator=gen(1, "cuda"))
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert torch.isfinite(s.grad.float()).all() and s.grad.float().abs().sum() > 0
    with pytest.raises(ValueError, match="teacher_probs"):
        consistency_loss(s, t.cpu())
    with pytest.raises(ValueError, match="owner"):
        structured_consistency_loss(s, t, owner.cpu())
    with pytest.raises(ValueError, match="generator"):
        structured_consistency_loss(s, t, owner, n_boxes=8, last_boxes=4, max_pairs=4, generator=gen(0))
    with pytest.raises(ValueError, match="target"):
        relaxed_boundary_loss(s.float(), torch.zeros(2, 6, 6, dtype=torch.long))


def test_pseudo_label_loss_is_the_masked_cross_entropy_to_the_teachers_confident_labels() -> None:
    """Pixel by pixel: CE to the teacher's argmax where its top probability is >= threshold and the
    pixel is not padding, summed and divided by the count of pixels that are not padding."""
    from sclseg.losses import pseudo_label_loss

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 3, 5, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 4, 3, 5, generator=gen) * 3
    ignore = torch.zeros(2, 3, 5, dtype=torch.long)
    ignore[0, 0] = 255
    total, count = 0.0, 0
    for b in range(2):
        for y in range(3):
            for x in range(5):
                if ignore[b, y, x] == 255:
                    continue
                count += 1
                p = teacher[b, :, y, x].softmax(0)
                if p.max() >= 0.6:
                    total += -torch.log_softmax(student[b, :, y, x], 0)[p.argmax()]
    by_hand = total / count
    loss = pseudo_label_loss(student, teacher, ignore, threshold=0.6)
    assert float(loss.detach()) == pytest.approx(float(by_hand.detach()), rel=1e-6)
    grad, = torch.autograd.grad(loss, student)
    grad_by_hand, = torch.autograd.grad(by_hand, student)
    assert torch.allclose(grad, grad_by_hand, atol=1e-7)
    everywhere = pseudo_label_loss(student, teacher, threshold=0.0)
    plain_ce = F.cross_entropy(student, teacher.argmax(1)).detach()
    assert float(everywhere.detach()) == pytest.approx(float(plain_ce), rel=1e-6)


def _ohem_by_sorting(logits: torch.Tensor, target: torch.Tensor, threshold: float, min_kept: int) -> torch.Tensor:
    """TorchSemiSeg's OHEM written from its definition: sort the own-class probabilities (ignored
    pixels at 1), cut at the threshold or at the min_kept-th smallest when that is larger."""
    flat = target.flatten()
    valid = flat != 255
    if min_kept == 0 or min_kept > int(valid.sum()):  # the reference mines only with min_kept > 0
        return F.cross_entropy(logits, target, ignore_index=255)
    probs = logits.detach().softmax(1).permute(1, 0, 2, 3).reshape(logits.shape[1], -1)
    own = torch.tensor([1.0 if not v else float(probs[t, i]) for i, (t, v) in enumerate(zip(flat, valid))])
    ordered = sorted(own.tolist())
    cut = max(threshold, ordered[min(len(ordered), min_kept) - 1])
    keep = valid & (own <= cut)
    return F.cross_entropy(logits, torch.where(keep, flat, 255).view_as(target), ignore_index=255)


@pytest.mark.parametrize("min_kept", [0, 5, 40, 1000])
def test_ohem_cross_entropy_keeps_the_hard_pixels_as_torchsemiseg_does(min_kept: int) -> None:
    from sclseg.losses import ohem_cross_entropy

    gen = torch.Generator().manual_seed(min_kept)
    logits = (torch.randn(2, 3, 6, 7, generator=gen) * 2).requires_grad_()
    target = torch.randint(0, 3, (2, 6, 7), generator=gen)
    target[0, :2] = 255
    loss = ohem_cross_entropy(logits, target, threshold=0.7, min_kept=min_kept)
    by_hand = _ohem_by_sorting(logits, target, 0.7, min_kept)
    assert float(loss.detach()) == pytest.approx(float(by_hand.detach()), rel=1e-6)
    grad, = torch.autograd.grad(loss, logits)
    grad_by_hand, = torch.autograd.grad(by_hand, logits)
    assert torch.allclose(grad, grad_by_hand, atol=1e-7)
