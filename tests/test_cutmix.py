"""CutMix boxes and owner maps against brute-force references (Python loops)."""

from __future__ import annotations

import math

import pytest
import torch

from sclseg.cutmix import BoxMaskGenerator, box_owner_map, mix, sample_boxes

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SIZES = [(32, 32), (17, 40), (5, 7), (1, 1)]


# ----------------------------------------------------------------------------- references


def ref_owner(boxes, height: int, width: int) -> torch.Tensor:
    """Paste the boxes in order, pixel by pixel; the last box wins, -1 where none covers."""
    out = [[-1] * width for _ in range(height)]
    for n, (y0, x0, y1, x1) in enumerate(torch.as_tensor(boxes).tolist()):
        for y in range(max(y0, 0), min(y1, height)):
            for x in range(max(x0, 0), min(x1, width)):
                out[y][x] = n
    return torch.tensor(out, dtype=torch.long)


def ref_mix(a: torch.Tensor, b: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    out = b.clone()
    for i in range(a.shape[0]):
        for y in range(a.shape[-2]):
            for x in range(a.shape[-1]):
                if int(owner[i, y, x]) >= 0:
                    out[i, ..., y, x] = a[i, ..., y, x]
    return out


def gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------- sample_boxes


@pytest.mark.parametrize("n_boxes", [1, 2, 32])
@pytest.mark.parametrize("size", SIZES)
def test_sample_boxes_shape_dtype_range(n_boxes, size):
    height, width = size
    for seed in range(20):
        boxes = sample_boxes(n_boxes, height, width, generator=gen(seed))
        assert boxes.shape == (n_boxes, 4)
        assert boxes.dtype == torch.long
        assert boxes.device.type == "cpu"
        for y0, x0, y1, x1 in boxes.tolist():
            assert 0 <= y0 <= y1 <= height
            assert 0 <= x0 <= x1 <= width


def test_sample_boxes_reproducible_under_generator():
    a = sample_boxes(32, 24, 40, generator=gen(123))
    b = sample_boxes(32, 24, 40, generator=gen(123))
    c = sample_boxes(32, 24, 40, generator=gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # one generator advances: two draws from it differ
    g = gen(5)
    assert not torch.equal(sample_boxes(32, 24, 40, generator=g), sample_boxes(32, 24, 40, generator=g))


def test_sample_boxes_default_rng_follows_manual_seed():
    torch.manual_seed(7)
    a = sample_boxes(8, 16, 16)
    torch.manual_seed(7)
    b = sample_boxes(8, 16, 16)
    assert torch.equal(a, b)


def test_sample_boxes_random_size_and_aspect_ratio():
    boxes = torch.cat([sample_boxes(32, 64, 64, generator=gen(s)) for s in range(20)])
    h = (boxes[:, 2] - boxes[:, 0]).double()
    w = (boxes[:, 3] - boxes[:, 1]).double()
    inside = (boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < 64) & (boxes[:, 3] < 64)
    assert inside.sum() > 20  # unclipped boxes exist, so sizes below are the drawn ones
    hi, wi = h[inside], w[inside]
    assert hi.max() > hi.min() + 2 and wi.max() > wi.min() + 2  # sizes vary
    ratio = hi / wi
    assert ratio.max() / ratio.min() > 1.5  # aspect ratios vary


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(n_boxes=0, height=8, width=8), "n_boxes"),
        (dict(n_boxes=4, height=0, width=8), "height"),
        (dict(n_boxes=4, height=8, width=0), "width"),
        (dict(n_boxes=4, height=8, width=8, area=0.0), "area"),
        (dict(n_boxes=4, height=8, width=8, area=1.0), "area"),
    ],
)
def test_sample_boxes_bad_input(kwargs, name):
    n, h, w = kwargs.pop("n_boxes"), kwargs.pop("height"), kwargs.pop("width")
    with pytest.raises(ValueError, match=name):
        sample_boxes(n, h, w, **kwargs)


# ----------------------------------------------------------------------------- box_owner_map


def test_box_owner_map_hand_example():
    boxes = torch.tensor([[0, 0, 2, 2], [1, 1, 3, 3], [0, 2, 0, 3]])  # the last one is empty
    expected = torch.tensor([[0, 0, -1], [0, 1, 1], [-1, 1, 1]])
    assert torch.equal(box_owner_map(boxes, 3, 3), expected)
    # overwrite, not XOR: box 0 pasted again on top of box 1 takes the overlap back
    boxes = torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2]])
    assert torch.equal(box_owner_map(boxes, 2, 2), torch.ones(2, 2, dtype=torch.long))


@pytest.mark.parametrize("size", [(9, 9), (7, 13), (1, 5)])
@pytest.mark.parametrize("seed", range(4))
def test_box_owner_map_matches_loop(size, seed):
    height, width = size
    g = gen(seed)
    n = 12
    y = torch.randint(0, height + 1, (n, 2), generator=g).sort(dim=1).values
    x = torch.randint(0, width + 1, (n, 2), generator=g).sort(dim=1).values
    boxes = torch.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], dim=1)
    boxes[3] = torch.tensor([0, 0, height, width])  # a full box, partly overwritten later
    owner = box_owner_map(boxes, height, width)
    assert owner.dtype == torch.long and owner.shape == (height, width)
    assert torch.equal(owner, ref_owner(boxes, height, width))


def test_box_owner_map_of_sampled_boxes_matches_loop():
    for seed in range(5):
        boxes = sample_boxes(32, 11, 14, generator=gen(seed))
        assert torch.equal(box_owner_map(boxes, 11, 14), ref_owner(boxes, 11, 14))


def test_box_owner_map_int32_boxes():
    boxes = torch.tensor([[1, 0, 3, 2]], dtype=torch.int32)
    assert torch.equal(box_owner_map(boxes, 4, 4), ref_owner(boxes.long(), 4, 4))


@pytest.mark.parametrize(
    "boxes, h, w, name",
    [
        (torch.zeros(3, 3, dtype=torch.long), 4, 4, "boxes"),
        (torch.zeros(2, 3, 4, dtype=torch.long), 4, 4, "boxes"),
        (torch.zeros(3, 4), 4, 4, "boxes"),
        (torch.zeros(3, 4, dtype=torch.long), 0, 4, "height"),
    ],
)
def test_box_owner_map_bad_input(boxes, h, w, name):
    with pytest.raises(ValueError, match=name):
        box_owner_map(boxes, h, w)


# ----------------------------------------------------------------------------- BoxMaskGenerator


@pytest.mark.parametrize("n_boxes", [1, 2, 32])
@pytest.mark.parametrize("size", SIZES)
def test_generator_shape_and_range(n_boxes, size):
    height, width = size
    owner = BoxMaskGenerator(n_boxes)(6, height, width, gen(0))
    assert owner.shape == (6, height, width)
    assert owner.dtype == torch.long
    assert int(owner.min()) >= -1 and int(owner.max()) < n_boxes


@pytest.mark.parametrize("n_boxes", [1, 5, 32])
def test_generator_equals_owner_map_of_its_boxes(n_boxes):
    gm = BoxMaskGenerator(n_boxes=n_boxes)
    boxes = gm.sample_boxes(4, 10, 13, gen(42))
    owner = gm(4, 10, 13, gen(42))
    assert boxes.shape == (4, n_boxes, 4) and boxes.dtype == torch.long
    for b in range(4):
        assert torch.equal(owner[b], ref_owner(boxes[b], 10, 13))


def test_generator_reproducible_and_images_differ():
    gm = BoxMaskGenerator(n_boxes=32)
    a = gm(4, 16, 16, gen(3))
    assert torch.equal(a, gm(4, 16, 16, gen(3)))
    assert not torch.equal(a, gm(4, 16, 16, gen(4)))
    assert not torch.equal(a[0], a[1])  # each image gets its own boxes


def test_generator_bad_input():
    with pytest.raises(ValueError, match="n_boxes"):
        BoxMaskGenerator(n_boxes=0)
    with pytest.raises(ValueError, match="area"):
        BoxMaskGenerator(n_boxes=4, area=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        BoxMaskGenerator(4)(0, 8, 8)
    with pytest.raises(ValueError, match="height"):
        BoxMaskGenerator(4)(2, 0, 8)


@pytest.mark.parametrize("n_boxes", [1, 2, 32])
@pytest.mark.parametrize("size", [(32, 32), (12, 40), (5, 7)])
def test_mean_union_coverage_is_half(n_boxes, size):
    height, width = size
    owner = BoxMaskGenerator(n_boxes=n_boxes)(4000, height, width, gen(n_boxes * 1000 + height))
    coverage = (owner >= 0).double().mean().item()
    assert abs(coverage - 0.5) < 0.02, coverage


@pytest.mark.parametrize("n_boxes", [1, 32])
def test_mean_union_coverage_other_area(n_boxes):
    owner = BoxMaskGenerator(n_boxes=n_boxes, area=0.3)(4000, 16, 24, gen(9))
    coverage = (owner >= 0).double().mean().item()
    assert abs(coverage - 0.3) < 0.02, coverage


@pytest.mark.parametrize("n_boxes", [1, 2, 32])
@pytest.mark.parametrize("size", [(8, 8), (6, 11)])
def test_every_pixel_covered_equally_often(n_boxes, size):
    height, width = size
    samples = 20000
    owner = BoxMaskGenerator(n_boxes=n_boxes)(samples, height, width, gen(11 + n_boxes))
    freq = (owner >= 0).double().mean(dim=0)  # (H, W): how often each pixel is inside a box
    tol = 5.0 * math.sqrt(0.25 / samples)  # 5 binomial standard errors
    assert (freq - 0.5).abs().max().item() < tol, freq
    # border pixels (corners included) are not under-covered
    border = torch.cat([freq[0], freq[-1], freq[:, 0], freq[:, -1]])
    assert (border - 0.5).abs().max().item() < tol


# ----------------------------------------------------------------------------- mix


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (3, 5, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.long])
def test_mix_matches_loop(shape, dtype):
    g = gen(1)
    a = torch.randint(0, 100, shape, generator=g).to(dtype)
    b = torch.randint(100, 200, shape, generator=g).to(dtype)
    owner = BoxMaskGenerator(n_boxes=4)(shape[0], shape[-2], shape[-1], g)
    owner[0, 0, 0] = 2  # make sure both branches occur
    owner[0, 0, 1] = -1
    out = mix(a, b, owner)
    assert out.shape == a.shape and out.dtype == dtype
    assert torch.equal(out, ref_mix(a, b, owner))


def test_mix_passes_gradients_to_both_inputs():
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    b = torch.randn(2, 3, 4, 4, requires_grad=True)
    owner = torch.full((2, 4, 4), -1, dtype=torch.long)
    owner[:, :2] = 0
    mix(a, b, owner).sum().backward()
    inside = (owner >= 0)[:, None].expand_as(a).float()
    assert torch.equal(a.grad, inside)
    assert torch.equal(b.grad, 1.0 - inside)


@pytest.mark.parametrize(
    "a_shape, b_shape, owner_shape, name",
    [
        ((2, 3, 4, 4), (2, 3, 4, 5), (2, 4, 4), "a and b"),
        ((2, 4), (2, 4), (2, 4), "a and b"),
        ((2, 3, 4, 4), (2, 3, 4, 4), (2, 4, 5), "owner"),
        ((2, 3, 4, 4), (2, 3, 4, 4), (3, 4, 4), "owner"),
        ((2, 4, 4), (2, 4, 4), (2, 1, 4, 4), "owner"),
    ],
)
def test_mix_bad_shapes(a_shape, b_shape, owner_shape, name):
    with pytest.raises(ValueError, match=name):
        mix(torch.zeros(a_shape), torch.zeros(b_shape), torch.zeros(owner_shape, dtype=torch.long))


def test_mix_mismatched_devices():
    a = torch.zeros(2, 3, 4, 4)
    owner_meta = torch.zeros(2, 4, 4, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="owner"):
        mix(a, a.clone(), owner_meta)
    with pytest.raises(ValueError, match="device"):
        mix(a, torch.zeros(2, 3, 4, 4, device="meta"), torch.zeros(2, 4, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- CUDA


@needs_cuda
def test_cuda_boxes_and_owner_maps():
    g = gen(0, "cuda")
    boxes = sample_boxes(32, 20, 30, generator=g)
    assert boxes.device.type == "cuda"
    assert torch.equal(box_owner_map(boxes, 20, 30).cpu(), ref_owner(boxes.cpu(), 20, 30))
    gm = BoxMaskGenerator(n_boxes=8)
    batch_boxes = gm.sample_boxes(3, 20, 30, gen(1, "cuda"))
    owner = gm(3, 20, 30, gen(1, "cuda"))
    assert owner.device.type == "cuda"
    for b in range(3):
        assert torch.equal(owner[b].cpu(), ref_owner(batch_boxes[b].cpu(), 20, 30))
    owner = gm(2, 9, 9, device="cuda")
    assert owner.device.type == "cuda" and owner.shape == (2, 9, 9)


@needs_cuda
def test_cuda_coverage_and_mix():
    owner = BoxMaskGenerator(n_boxes=32)(4000, 16, 24, gen(2, "cuda"))
    assert abs((owner >= 0).double().mean().item() - 0.5) < 0.02
    a = torch.randn(4, 3, 16, 24, device="cuda")
    b = torch.randn(4, 3, 16, 24, device="cuda")
    out = mix(a, b, owner[:4])
    assert torch.equal(out.cpu(), ref_mix(a.cpu(), b.cpu(), owner[:4].cpu()))
    with pytest.raises(ValueError, match="owner"):
        mix(a, b, owner[:4].cpu())
