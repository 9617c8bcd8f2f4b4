"""Sliding-window, multi-scale and flip inference against whole-image references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sclseg.engine.inference import predict_probs, tile_starts

from toy_models import Pointwise


class SymmetricConv(nn.Module):
    """A 3x3 convolution whose kernels are mirror-symmetric left-right: flip-equivariant."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, classes, 3, padding=1)
        with torch.no_grad():
            w = self.conv.weight
            w.copy_((w + w.flip(-1)) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CallCounter(nn.Module):
    """Constant scores that differ per call; records the tiles it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = torch.zeros(x.shape[0], 2, *x.shape[-2:])
        logits[:, 0] = float(self.calls)
        return logits


@pytest.mark.parametrize("length,tile,stride", [(10, 4, 2), (10, 4, 3), (7, 7, 3), (5, 8, 4), (100, 33, 22)])
def test_tile_starts_cover_the_range_and_end_flush(length: int, tile: int, stride: int) -> None:
    starts = tile_starts(length, tile, stride)
    assert starts[0] == 0 and starts == sorted(set(starts))
    covered = set()
    for s in starts:
        covered |= set(range(s, min(length, s + tile)))
    assert covered == set(range(length))
    if length > tile:
        assert starts[-1] == length - tile
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("tile", [(8, 8), (16, 12), (40, 40)])
@pytest.mark.parametrize("overlap", [0.0, 1 / 3, 0.5])
def test_tiles_equal_whole_image_for_a_pointwise_model(tile, overlap) -> None:
    model = Pointwise().eval()
    images = torch.rand(2, 3, 29, 37)
    whole = predict_probs(model, images)
    tiled = predict_probs(model, images, tile=tile, overlap=overlap)
    assert tiled.shape == whole.shape == (2, 4, 29, 37)
    torch.testing.assert_close(tiled, whole, rtol=1e-6, atol=1e-6)


def test_overlapping_tiles_are_averaged_by_the_count_of_tiles_per_pixel() -> None:
    model = CallCounter()
    images = torch.zeros(1, 3, 1, 10)  # tiles of width 4, stride 2: starts 0, 2, 4, 6
    probs = predict_probs(model, images, tile=(1, 4), overlap=0.5)
    assert model.calls == 4
    # pixel x gets the mean over the tiles covering it of softmax([call, 0])[0]
    expected = []
    for x in range(10):
        calls = [i + 1 for i, s in enumerate((0, 2, 4, 6)) if s <= x < s + 4]
        expected.append(sum(torch.tensor([float(c), 0.0]).softmax(0)[0].item() for c in calls) / len(calls))
    torch.testing.assert_close(probs[0, 0, 0], torch.tensor(expected))


def test_flip_of_a_flip_equivariant_model_changes_nothing() -> None:
    model = SymmetricConv().eval()
    images = torch.rand(2, 3, 21, 30)
    plain = predict_probs(model, images)
    flipped = predict_probs(model, images, flip=True)
    torch.testing.assert_close(flipped, plain, rtol=1e-6, atol=1e-6)
    # and the flip is undone: a model that is not symmetric gives the mean of both orientations
    torch.manual_seed(2)
    asym = nn.Conv2d(3, 3, 3, padding=1).eval()
    expected = (asym(images).softmax(1) + asym(images.flip(-1)).softmax(1).flip(-1)) / 2
    torch.testing.assert_close(predict_probs(asym, images, flip=True), expected.detach(), rtol=1e-6, atol=1e-6)


def test_multi_scale_is_the_mean_of_the_resized_scores() -> None:
    model = Pointwise().eval()
    images = torch.rand(1, 3, 17, 23)
    out = predict_probs(model, images, scales=(0.5, 1.0, 2.0))
    assert out.shape == (1, 4, 17, 23)
    resize = torch.nn.functional.interpolate
    parts = []
    for scale in (0.5, 1.0, 2.0):
        size = (round(17 * scale), round(23 * scale))
        scaled = images if scale == 1.0 else resize(images, size=size, mode="bilinear", align_corners=False)
        probs = model(scaled).softmax(1)
        parts.append(probs if scale == 1.0 else resize(probs, size=(17, 23), mode="bilinear", align_corners=False))
    torch.testing.assert_close(out, (sum(parts) / 3).detach(), rtol=1e-6, atol=1e-6)


def test_multi_scale_flip_and_tiles_together_keep_probabilities_normalised() -> None:
    model = SymmetricConv().eval()
    images = torch.rand(1, 3, 33, 45)
    out = predict_probs(model, images, scales=(0.5, 1.0, 1.5), flip=True, tile=(16, 16), overlap=1 / 3)
    assert out.shape == (1, 3, 33, 45)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 33, 45), rtol=1e-5, atol=1e-5)


def test_the_tiles_protocol_is_the_default_and_unknown_protocols_are_refused() -> None:
    model = SymmetricConv().eval()
    images = torch.rand(1, 3, 25, 31)
    default = predict_probs(model, images, tile=(12, 12))
    assert torch.equal(predict_probs(model, images, tile=(12, 12), protocol="tiles"), default)
    with pytest.raises(ValueError, match="eval.protocol"):
        predict_probs(model, images, protocol="sliding")


@pytest.mark.parametrize("protocol", ["unimatch_v1", "unimatch_v2"])
def test_unimatch_windows_compose_with_scales_and_flip(protocol) -> None:
    model = SymmetricConv().eval()
    images = torch.rand(1, 3, 30, 44)
    out = predict_probs(model, images, scales=(0.75, 1.0), flip=True, tile=(12, 12), protocol=protocol)
    assert out.shape == (1, 3, 30, 44)
    torch.testing.assert_close(out.sum(1), torch.ones(1, 30, 44), rtol=1e-5, atol=1e-5)
    resize = torch.nn.functional.interpolate
    parts = []
    for scale in (0.75, 1.0):
        scaled = resize(images, size=(round(30 * scale), round(44 * scale)), mode="bilinear", align_corners=False) \
            if scale != 1.0 else images
        for flipped in (False, True):
            inp = scaled.flip(-1) if flipped else scaled
            probs = predict_probs(model, inp, tile=(12, 12), protocol=protocol)
            probs = probs.flip(-1) if flipped else probs
            parts.append(resize(probs, size=(30, 44), mode="bilinear", align_corners=False) if scale != 1.0 else probs)
    torch.testing.assert_close(out, sum(parts) / 4, rtol=1e-6, atol=1e-6)
