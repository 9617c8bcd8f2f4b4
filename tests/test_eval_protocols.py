"""UniMatch V1's and V2's sliding-window evaluation against their placements worked by hand and a
transcription of their loops (``evaluate`` in UniMatch's ``supervised.py``, UniMatch-V2's likewise)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sclseg.engine.inference import predict_probs, unimatch_v1_windows, unimatch_v2_windows, window_mode_name

from toy_models import Pointwise


class Contextual(nn.Module):
    """Scores that depend on the whole window (its mean colour) and on its size: windows matter."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, classes, 3, padding=1)
        self.context = nn.Linear(3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = torch.tensor(float(x.shape[-1] * 7 + x.shape[-2])).sin()
        return self.conv(x) + (self.context(x.mean((2, 3))) * size)[:, :, None, None]


def test_unimatch_v1_windows_by_hand() -> None:
    # window 6 -> stride int(6 * 2 / 3) = 4; starts 0, 4, 8 while < 10, each clipped at 10
    assert unimatch_v1_windows(10, 6) == [(0, 6), (4, 10), (8, 10)]
    assert unimatch_v1_windows(12, 6) == [(0, 6), (4, 10), (8, 12)]
    assert unimatch_v1_windows(5, 6) == [(0, 5), (4, 5)]  # a start inside the image opens a window
    # Cityscapes, 801 windows, stride 534
    assert unimatch_v1_windows(1024, 801) == [(0, 801), (534, 1024)]
    assert unimatch_v1_windows(2048, 801) == [(0, 801), (534, 1335), (1068, 1869), (1602, 2048)]


def test_unimatch_v2_windows_by_hand() -> None:
    # window 6 -> stride 4; full windows, the last one moved back to end at the border
    assert unimatch_v2_windows(10, 6) == [(0, 6), (4, 10)]
    assert unimatch_v2_windows(11, 6) == [(0, 6), (4, 10), (5, 11)]
    assert unimatch_v2_windows(6, 6) == [(0, 6)]
    assert unimatch_v2_windows(4, 6) == [(0, 4)]
    # Cityscapes, 798 windows, stride 532
    assert unimatch_v2_windows(1024, 798) == [(0, 798), (226, 1024)]
    assert unimatch_v2_windows(2048, 798) == [(0, 798), (532, 1330), (1064, 1862), (1250, 2048)]


def unimatch_v1_loop(model: nn.Module, img: torch.Tensor, grid: int) -> torch.Tensor:
    """UniMatch V1's ``sliding_window`` loop, transcribed: softmax summed over clipped windows."""
    b, _, h, w = img.shape
    final = None
    row = 0
    while row < h:
        col = 0
        while col < w:
            pred = model(img[:, :, row: min(h, row + grid), col: min(w, col + grid)])
            if final is None:
                final = torch.zeros(b, pred.shape[1], h, w)
            final[:, :, row: min(h, row + grid), col: min(w, col + grid)] += pred.softmax(dim=1)
            col += int(grid * 2 / 3)
        row += int(grid * 2 / 3)
    return final


def unimatch_v2_loop(model: nn.Module, img: torch.Tensor, grid: int) -> torch.Tensor:
    """UniMatch V2's ``sliding_window`` loop, transcribed: full windows, the last shifted to the border."""
    b, _, h, w = img.shape
    final = None
    row = 0
    while row < h:
        col = 0
        while col < w:
            pred = model(img[:, :, row: row + grid, col: col + grid])
            if final is None:
                final = torch.zeros(b, pred.shape[1], h, w)
            final[:, :, row: row + grid, col: col + grid] += pred.softmax(dim=1)
            if col == w - grid:
                break
            col = min(col + int(grid * 2 / 3), w - grid)
        if row == h - grid:
            break
        row = min(row + int(grid * 2 / 3), h - grid)
    return final


def coverage(spans_h, spans_w, h: int, w: int) -> torch.Tensor:
    count = torch.zeros(h, w)
    for y0, y1 in spans_h:
        for x0, x1 in spans_w:
            count[y0:y1, x0:x1] += 1
    return count


@pytest.mark.parametrize("protocol,loop,spans,size,grid", [
    ("unimatch_v1", unimatch_v1_loop, unimatch_v1_windows, (17, 29), 9),
    ("unimatch_v1", unimatch_v1_loop, unimatch_v1_windows, (16, 32), 8),
    ("unimatch_v2", unimatch_v2_loop, unimatch_v2_windows, (17, 29), 9),
    ("unimatch_v2", unimatch_v2_loop, unimatch_v2_windows, (16, 32), 8),
])
def test_window_sums_equal_the_reference_loops(protocol, loop, spans, size, grid) -> None:
    model = Contextual().eval()
    images = torch.rand(2, 3, *size)
    probs = predict_probs(model, images, protocol=protocol, tile=(grid, grid))
    with torch.no_grad():
        summed = loop(model, images, grid)
    count = coverage(spans(size[0], grid), spans(size[1], grid), *size)
    torch.testing.assert_close(probs * count, summed, rtol=1e-6, atol=1e-6)
    assert torch.equal(probs.argmax(1), summed.argmax(1))
    torch.testing.assert_close(probs.sum(1), torch.ones(2, *size))


def test_the_protocols_differ_where_windows_do() -> None:
    model = Contextual().eval()
    images = torch.rand(1, 3, 17, 29)
    v1 = predict_probs(model, images, protocol="unimatch_v1", tile=(9, 9))
    v2 = predict_probs(model, images, protocol="unimatch_v2", tile=(9, 9))
    assert (v1 - v2).abs().max() > 1e-3


@pytest.mark.parametrize("protocol", ["unimatch_v1", "unimatch_v2"])
def test_a_pointwise_model_gives_the_whole_image_scores_under_every_protocol(protocol) -> None:
    model = Pointwise().eval()
    images = torch.rand(1, 3, 23, 31)
    torch.testing.assert_close(predict_probs(model, images, protocol=protocol, tile=(10, 10)),
                               predict_probs(model, images), rtol=1e-6, atol=1e-6)


def test_cityscapes_windows_are_the_default_window_sizes() -> None:
    """Without ``tile`` the windows are 801 (V1) and 798 (V2): a 1024 x 2048 image takes 2 x 4 calls."""
    calls = []

    class Recorder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(x.shape[-2:]))
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    images = torch.zeros(1, 3, 1024, 2048)
    predict_probs(Recorder(), images, protocol="unimatch_v2")
    assert calls == [(798, 798)] * 8
    calls.clear()
    predict_probs(Recorder(), images, protocol="unimatch_v1")
    assert calls == [(801, 801), (801, 801), (801, 801), (801, 446), (490, 801), (490, 801), (490, 801), (490, 446)]


def test_every_mode_has_a_name() -> None:
    assert window_mode_name("tiles", None) == "whole"
    assert window_mode_name("tiles", [800, 800]) == "sliding"
    assert window_mode_name("unimatch_v1", None) == "unimatch_v1_801"
    assert window_mode_name("unimatch_v2", None) == "unimatch_v2_798"
    assert window_mode_name("unimatch_v2", [798, 1022]) == "unimatch_v2_798x1022"
    with pytest.raises(ValueError, match="eval.protocol"):
        window_mode_name("mmseg", None)
