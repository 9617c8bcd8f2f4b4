"""Batched photometric augmentation against torchvision's per-image functions, its parameter
draws, and where the trainer applies it."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from sclseg.config import load_config, resolve_config_path
from sclseg.data import build_data
from sclseg.data.stream import batch_to_device, make_stream
from sclseg.data.transforms import (
    PARAMS,
    PhotometricAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    build_photometric,
    gaussian_blur,
)
from sclseg.engine.seeding import stream_seed
from sclseg.engine.trainer import Trainer

from tiny_config import TINY


def images(batch: int = 6, height: int = 20, width: int = 24) -> torch.Tensor:
    """Random images with a gray band (no chroma), a black band and a saturated band."""
    x = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    x[:, :, :3] = x[:, :1, :3]  # r = g = b
    x[:, :, 3:5] = 0.0
    x[:, 0, 5:7], x[:, 1:, 5:7] = 1.0, 0.0
    return x


FACTORS = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.55, 1.9])
SHIFTS = torch.tensor([-0.5, -0.2, 0.0, 0.1, 0.33, 0.5])


@pytest.mark.parametrize("ours, theirs, values", [
    (adjust_brightness, TF.adjust_brightness, FACTORS),
    (adjust_contrast, TF.adjust_contrast, FACTORS),
    (adjust_saturation, TF.adjust_saturation, FACTORS),
    (adjust_hue, TF.adjust_hue, SHIFTS),
])
def test_each_adjustment_equals_torchvision_on_every_image_with_its_own_factor(ours, theirs, values) -> None:
    x = images()
    expected = torch.stack([theirs(x[i], float(values[i])) for i in range(len(x))])
    torch.testing.assert_close(ours(x, values), expected, atol=2e-6, rtol=0)


def test_a_zero_hue_shift_and_unit_factors_leave_the_images() -> None:
    x = images()
    ones = torch.ones(len(x))
    torch.testing.assert_close(adjust_hue(x, torch.zeros(len(x))), x, atol=2e-6, rtol=0)
    for adjust in (adjust_brightness, adjust_contrast, adjust_saturation):
        assert torch.equal(adjust(x, ones), x)


def test_blur_equals_torchvision_per_image_and_sigma_zero_is_the_identity() -> None:
    x = images()
    sigmas = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 0.3])
    out = gaussian_blur(x, sigmas, 5)
    assert torch.equal(out[0], x[0])
    expected = torch.stack([TF.gaussian_blur(x[i], [5, 5], [float(sigmas[i])] * 2) for i in range(1, len(x))])
    torch.testing.assert_close(out[1:], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(x, sigmas, 4)


def test_the_kernel_grows_with_the_crop_from_3_to_9_taps() -> None:
    assert [blur_kernel_size(c) for c in ([16, 16], [64, 64], [64, 200], [128, 128], [800, 800])] == [3, 5, 5, 9, 9]


def test_draws_follow_the_recipe_ranges_and_probabilities() -> None:
    augment = PhotometricAugment(color_jitter=0.3, blur_prob=0.25, blur_kernel=5)
    generator = torch.Generator().manual_seed(1)
    rows = torch.stack([augment.draw(generator) for _ in range(4000)])
    assert rows.shape == (4000, len(PARAMS)) and rows.dtype == torch.float32
    col = {name: rows[:, i] for i, name in enumerate(PARAMS)}

    def close_to(rate: float, p: float) -> bool:  # within 4 binomial standard deviations
        return abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / len(rows))

    assert set(col["jitter"].tolist()) == {0.0, 1.0} and close_to(float(col["jitter"].mean()), 0.8)
    for name in ("brightness", "contrast", "saturation"):
        assert 0.7 <= col[name].min() and col[name].max() <= 1.3
        assert abs(float(col[name].mean()) - 1.0) < 0.01 and float(col[name].max() - col[name].min()) > 0.59
    hue = col["hue"]
    assert -0.075 <= hue.min() and hue.max() <= 0.075 and float(hue.max() - hue.min()) > 0.148
    blurred = col["sigma"] > 0
    assert close_to(float(blurred.float().mean()), 0.25)
    assert 0.1 <= col["sigma"][blurred].min() and col["sigma"][blurred].max() <= 2.0
    # the draws are the same under the same seed (the stream seeds each sample)
    again = torch.stack([augment.draw(torch.Generator().manual_seed(1)) for _ in range(2)])
    assert torch.equal(again[0], again[1])
    # a strong jitter keeps its factors >= 0 and its hue within [-0.5, 0.5]
    strong = torch.stack([PhotometricAugment(3.0, 0.0, 3).draw(generator) for _ in range(500)])
    assert strong[:, 1:4].min() >= 0.0 and strong[:, 4].abs().max() <= 0.5 and (strong[:, 5] == 0).all()


def test_each_row_applies_its_jitter_in_order_then_its_blur() -> None:
    augment = PhotometricAugment(color_jitter=0.3, blur_prob=0.5, blur_kernel=5)
    x = images(4)
    rows = torch.tensor([
        [0.0, 1.2, 0.8, 1.1, 0.05, 0.0],  # jitter off, no blur: unchanged
        [1.0, 1.2, 0.8, 1.1, 0.05, 0.0],  # jitter only
        [0.0, 0.9, 1.1, 0.7, -0.05, 1.5],  # blur only
        [1.0, 0.9, 1.1, 0.7, -0.05, 1.5],  # both
    ])
    out = augment(x, rows)
    assert torch.equal(out[0], x[0])

    def jitter(image: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        image = TF.adjust_brightness(image, float(row[1]))
        image = TF.adjust_contrast(image, float(row[2]))
        image = TF.adjust_saturation(image, float(row[3]))
        return TF.adjust_hue(image, float(row[4]))

    blur = lambda image, row: TF.gaussian_blur(image, [5, 5], [float(row[5])] * 2)  # noqa: E731
    expected = [jitter(x[1], rows[1]), blur(x[2], rows[2]), blur(jitter(x[3], rows[3]), rows[3])]
    torch.testing.assert_close(out[1:], torch.stack(expected), atol=3e-6, rtol=0)


def test_the_config_builds_it_and_the_trainer_applies_it_to_every_batch(tmp_path) -> None:
    cfg = load_config(resolve_config_path("digits/default"))
    augment = build_photometric(cfg.data)
    assert augment == PhotometricAugment(cfg.data.color_jitter, cfg.data.blur_prob, 5)
    assert build_photometric(load_config(None, ["data.color_jitter=0", "data.blur_prob=0"]).data) is None

    x = images(3)
    rows = torch.stack([augment.draw(torch.Generator().manual_seed(s)) for s in range(3)])
    batch = {"image": x, "mask": torch.zeros(3, 20, 24, dtype=torch.long), "photometric": rows, "name": ["a", "b", "c"]}
    moved = batch_to_device(batch, torch.device("cpu"), photometric=augment, channels_last=True)
    assert "photometric" not in moved and moved["name"] == ["a", "b", "c"]
    assert moved["image"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(moved["image"], augment(x, rows))
    assert torch.equal(batch_to_device(batch, torch.device("cpu"))["image"], x)  # without it: as loaded

    trainer = Trainer(load_config(resolve_config_path("digits/default"), TINY), tmp_path / "run", show_progress=False)
    view = trainer._stream("labeled")
    try:
        assert "photometric" not in next(view)  # a CPU device: the loader augments (augment_in_loader)
    finally:
        view.close()
    stream = trainer._stream("labeled")
    twin = make_stream(trainer.data.labeled, 4, seed=stream_seed(trainer.cfg.train.seed, "labeled"),
                       photometric=trainer.photometric)
    try:
        for _ in range(2):
            raw = next(twin)
            assert raw["photometric"].shape == (4, len(PARAMS))
            (step_batch,) = trainer._next_batches(stream)
            assert torch.equal(step_batch["image"], trainer.photometric(raw["image"], raw["photometric"]))
            assert torch.equal(step_batch["mask"], raw["mask"])
    finally:
        stream.close()
        twin.close()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_loader_that_augments_gives_the_batches_that_batch_to_device_augments(num_workers: int) -> None:
    cfg = load_config(resolve_config_path("digits/default"), TINY)
    data, augment = build_data(cfg), build_photometric(cfg.data)
    plain = make_stream(data.unlabeled, 4, seed=3, photometric=augment)
    loaded = make_stream(data.unlabeled, 4, seed=3, photometric=augment, augment_in_loader=True,
                         num_workers=num_workers)
    try:
        for _ in range(3):
            expected = batch_to_device(next(plain), torch.device("cpu"), photometric=augment)
            batch = next(loaded)
            assert "photometric" not in batch
            assert torch.equal(batch["image"], expected["image"])
            assert torch.equal(batch_to_device(batch, torch.device("cpu"), photometric=augment)["image"],
                               expected["image"])  # a batch without rows is not augmented twice
    finally:
        plain.close()
        loaded.close()
