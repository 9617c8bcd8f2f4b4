"""The boundary band and boundary mIoU against a hand-worked mask and brute-force loops."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sclseg.config import EvalConfig, config_from_dict
from sclseg.engine.evaluation import evaluate_model
from sclseg.metrics import ConfusionMatrix, boundary_band

X = 255  # ignore
# classes 0 (top left), 1 (right), 2 (bottom left) with an ignore hole between 2 and 1
MASK = torch.tensor([
    [0, 0, 0, 1, 1, 1],
    [0, 0, 0, 1, 1, 1],
    [0, 0, 0, 1, 1, 1],
    [2, 2, X, X, 1, 1],
    [2, 2, X, X, 1, 1],
    [2, 2, 2, 2, 1, 1],
])
# width 1, worked by hand: a pixel is in the band when its 3x3 window holds another labelled
# class. (3, 4) and (4, 1) touch only their own class and the ignore hole, so they are not.
BAND_1 = torch.tensor([
    [0, 0, 1, 1, 0, 0],
    [0, 0, 1, 1, 0, 0],
    [1, 1, 1, 1, 0, 0],
    [1, 1, 0, 0, 0, 0],
    [0, 0, 0, 0, 1, 0],
    [0, 0, 0, 1, 1, 0],
], dtype=torch.bool)


def _brute_band(mask: torch.Tensor, width: int, ignore: int = X) -> torch.Tensor:
    b, h, w = mask.shape
    band = torch.zeros_like(mask, dtype=torch.bool)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                label = int(mask[i, y, x])
                if label == ignore:
                    continue
                for yy in range(max(0, y - width), min(h, y + width + 1)):
                    for xx in range(max(0, x - width), min(w, x + width + 1)):
                        other = int(mask[i, yy, xx])
                        if other != ignore and other != label:
                            band[i, y, x] = True
    return band


def _brute_miou(pred: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, num_classes: int) -> float:
    ious = []
    for c in range(num_classes):
        tp = fp = fn = 0
        for p, t, k in zip(pred.flatten().tolist(), mask.flatten().tolist(), keep.flatten().tolist()):
            if not k or t == X:
                continue
            tp += p == c and t == c
            fp += p == c and t != c
            fn += p != c and t == c
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    return 100 * sum(ious) / len(ious)


def test_band_of_the_hand_made_mask() -> None:
    assert torch.equal(boundary_band(MASK[None], 1), BAND_1[None])
    assert torch.equal(boundary_band(MASK[None], 1), _brute_band(MASK[None], 1))


@pytest.mark.parametrize("width", [1, 2, 3])
def test_band_matches_brute_force_on_random_masks(width) -> None:
    g = torch.Generator().manual_seed(width)
    # blocky masks: 3x3-pixel cells of 4 classes, and some ignore pixels
    cells = torch.randint(0, 4, (3, 5, 6), generator=g)
    mask = cells.repeat_interleave(3, 1).repeat_interleave(3, 2)[:, :13, :17]
    mask[torch.rand(mask.shape, generator=g) < 0.1] = X
    assert torch.equal(boundary_band(mask, width), _brute_band(mask, width))


def test_band_without_edges_and_bad_width() -> None:
    flat = torch.full((1, 4, 5), 2)
    flat[0, 0, 0] = X
    assert not boundary_band(flat, 2).any()
    with pytest.raises(ValueError, match="boundary width"):
        boundary_band(flat, 0)


class _Labels:
    """Images whose first channel holds the predicted class (/255) and masks; evaluate_model's view of a dataset."""

    ignore_index = X

    def __init__(self, preds: torch.Tensor, masks: torch.Tensor, num_classes: int) -> None:
        self.preds, self.masks = preds, masks
        self.classes = [SimpleNamespace(name=f"c{i}") for i in range(num_classes)]
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.preds[i].float().div(255).expand(3, -1, -1), "mask": self.masks[i]}


class _Oracle(nn.Module):
    """Logits that make argmax the class written in the image."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        labels = (images[:, 0] * 255).round().long()
        return nn.functional.one_hot(labels, self.num_classes).permute(0, 3, 1, 2).float() * 10


def test_boundary_miou_of_the_hand_made_mask() -> None:
    # predicting class 0 everywhere: the band holds 5 pixels of class 0, 5 of class 1 and 3 of
    # class 2 (13), so IoU_0 = 5/13 and the others 0: boundary mIoU = 100 * 5/13 / 3 = 12.8205.
    # The whole image: 9 of 32 labelled pixels are class 0: mIoU = 100 * 9/32 / 3 = 9.375.
    data = _Labels(torch.zeros(1, 6, 6, dtype=torch.long), MASK[None], 3)
    result = evaluate_model(_Oracle(3), data, EvalConfig(boundary_width=1), device=torch.device("cpu"))
    assert result["boundary_miou"] == pytest.approx(100 * 5 / 13 / 3)
    assert result["miou"] == pytest.approx(9.375)
    assert result["boundary_pixels"] == 13 and result["boundary_width"] == 1
    assert result["boundary_per_class_iou"] == pytest.approx({"c0": 100 * 5 / 13, "c1": 0.0, "c2": 0.0})


def test_boundary_miou_matches_brute_force_and_leaves_miou_alone() -> None:
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 3, (5, 4, 4), generator=g).repeat_interleave(3, 1).repeat_interleave(3, 2)
    masks[torch.rand(masks.shape, generator=g) < 0.05] = X
    preds = torch.where(torch.rand(masks.shape, generator=g) < 0.7, masks.clamp_max(2),
                        torch.randint(0, 3, masks.shape, generator=g))
    data, model = _Labels(preds, masks, 3), _Oracle(3)
    cpu = torch.device("cpu")
    on = evaluate_model(model, data, EvalConfig(boundary_width=2, batch_size=2), device=cpu)
    off = evaluate_model(model, data, EvalConfig(boundary_width=0), device=cpu)
    band = _brute_band(masks, 2)
    assert on["boundary_miou"] == pytest.approx(_brute_miou(preds, masks, band, 3))
    assert on["boundary_pixels"] == int(band.sum())
    assert on["miou"] == off["miou"] == pytest.approx(_brute_miou(preds, masks, torch.ones_like(band), 3))
    assert "boundary_miou" not in off
    with pytest.raises(ValueError, match="eval.boundary_width: expected >= 0"):
        config_from_dict({"eval": {"boundary_width": -1}})


def test_confusion_matrix_of_band_pixels_only() -> None:
    # the band's matrix is the full matrix of the selected pixels: 1-D selections are accepted
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, X]))
    assert cm.matrix.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]


def test_miou_against_a_hand_computed_confusion_matrix() -> None:
    # 3 classes; ignore = 255
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = ConfusionMatrix(3, 255)
    cm.update(pred, target)
    # rows true, cols pred: class0 -> {0:1, 1:1}; class1 -> {1:2, 0:1}; class2 -> {2:1, 0:1}
    assert cm.matrix.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 1]]
    iou = [1 / (2 + 3 - 1), 2 / (3 + 3 - 2), 1 / (2 + 1 - 1)]
    assert cm.iou().tolist() == pytest.approx(iou)
    assert cm.miou() == pytest.approx(100 * sum(iou) / 3)
    assert cm.pixel_accuracy() == pytest.approx(100 * 4 / 7)
    summary = cm.summary(["a", "b", "c"])
    assert summary["per_class_iou"]["b"] == pytest.approx(50.0)


def test_confusion_matrix_rejects_labels_outside_the_classes() -> None:
    cm = ConfusionMatrix(3, 255)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
