"""Scoring prediction PNGs on disk; the official Cityscapes evaluator as the reference."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sclseg.data.base import ClassInfo, SegmentationDataset
from sclseg.engine.evaluation import find_predictions, score_prediction_dir
from sclseg.metrics import ConfusionMatrix
from sclseg.viz import write_cityscapes_prediction, write_color_png, write_index_png


class Tiny(SegmentationDataset):
    """An in-memory labeled dataset with 3 classes."""

    classes = [ClassInfo("zero", (0, 0, 0)), ClassInfo("one", (255, 0, 0)), ClassInfo("two", (0, 255, 0))]

    def __init__(self, masks: list[np.ndarray]):
        super().__init__()
        self.masks = masks

    def __len__(self):
        return len(self.masks)

    def load(self, i):
        m = torch.from_numpy(self.masks[i].astype(np.int64))
        return torch.zeros(3, *m.shape, dtype=torch.uint8), m, f"img_{i}"


def test_scores_equal_a_direct_confusion_matrix(tmp_path):
    rng = np.random.default_rng(0)
    masks = [rng.integers(0, 3, (9, 13)) for _ in range(3)]
    masks[0][:2] = 255
    ds = Tiny(masks)
    ref = ConfusionMatrix(3)
    for i, m in enumerate(masks):
        pred = np.where(rng.random(m.shape) < 0.6, np.minimum(m, 2), rng.integers(0, 3, m.shape))
        ref.update(torch.from_numpy(pred), torch.from_numpy(m))
        # the CLI's own output name, a colour image beside it (ignored), nested folders (searched)
        write_index_png(pred, tmp_path / "sub" / f"img_{i}_labels.png", palette=np.zeros((256, 3)))
        write_color_png(pred, tmp_path / "sub" / f"img_{i}_color.png", Tiny.classes)
    result = score_prediction_dir(ds, tmp_path)
    expected = ref.summary([c.name for c in Tiny.classes])
    assert result["eval_mode"] == "files" and result["images"] == 3 and result["missing"] == 0
    assert math.isclose(result["miou"], expected["miou"], rel_tol=1e-12)
    assert math.isclose(result["pixel_accuracy"], expected["pixel_accuracy"], rel_tol=1e-12)
    assert result["per_class_iou"] == pytest.approx(expected["per_class_iou"], rel=1e-12)
    assert result["prediction_ids"] == "class_indices"


def test_predictions_that_are_no_class_count_as_misses_only(tmp_path):
    target = np.array([[0, 0, 1, 1]])
    pred = np.array([[0, 255, 1, 2]])  # 255: no class (FN for class 0, FP for nobody)
    write_index_png(pred, tmp_path / "img_0.png")
    r = score_prediction_dir(Tiny([target]), tmp_path)
    assert r["per_class_iou"]["zero"] == pytest.approx(50.0)  # tp 1 / (tp 1 + fn 1)
    assert r["per_class_iou"]["one"] == pytest.approx(50.0)  # tp 1 / (tp 1 + fn 1)
    assert r["per_class_iou"]["two"] == pytest.approx(0.0)  # fp 1
    assert r["pixel_accuracy"] == pytest.approx(50.0)
    assert r["miou"] == pytest.approx(100 / 3)


def test_file_errors(tmp_path):
    ds = Tiny([np.zeros((4, 5), dtype=np.int64)] * 2)
    write_index_png(np.zeros((4, 5)), tmp_path / "img_0.png")
    with pytest.raises(FileNotFoundError, match="no prediction for 'img_1'"):
        score_prediction_dir(ds, tmp_path)
    r = score_prediction_dir(ds, tmp_path, allow_missing=True)
    assert (r["images"], r["missing"]) == (1, 1)
    write_index_png(np.zeros((4, 6)), tmp_path / "img_1.png")
    with pytest.raises(ValueError, match=r"img_1\.png: prediction is 6x4 .* label of 'img_1' is 5x4"):
        score_prediction_dir(ds, tmp_path)
    Image.fromarray(np.zeros((4, 5, 3), dtype=np.uint8)).save(tmp_path / "img_1.png")
    with pytest.raises(ValueError, match="3 channels"):
        score_prediction_dir(ds, tmp_path)
    write_index_png(np.zeros((4, 5)), tmp_path / "img_1.png")
    write_index_png(np.zeros((4, 5)), tmp_path / "img_1_pred.png")
    assert find_predictions(tmp_path, ["img_1"])["img_1"].name == "img_1.png"  # the exact name wins
    (tmp_path / "img_1.png").unlink()
    write_index_png(np.zeros((4, 5)), tmp_path / "other" / "img_1_labels.png")
    with pytest.raises(ValueError, match="several predictions for 'img_1'"):
        score_prediction_dir(ds, tmp_path)
    with pytest.raises(FileNotFoundError, match="prediction folder not found"):
        score_prediction_dir(ds, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="Cityscapes only"):
        score_prediction_dir(ds, tmp_path, ids="label_ids")


# --------------------------------------------------------------------------- Cityscapes

# The tests below need the 'cityscapes' extra; the ones above do not, so the skip is per test.
def _has_cityscapesscripts() -> bool:
    try:
        import cityscapesscripts.helpers.labels  # noqa: F401
    except ImportError:
        return False
    return True


needs_cityscapes = pytest.mark.skipif(
    not _has_cityscapesscripts(), reason="the 'cityscapes' extra (cityscapesscripts) is not installed"
)


@pytest.fixture()
def cs():
    from sclseg.data import cityscapes

    return cityscapes


def build_tree(*args, **kwargs):
    from test_cityscapes import build_tree as build  # tests/ is on sys.path under pytest

    return build(*args, **kwargs)


def valid_ids() -> list[int]:
    from test_cityscapes import VALID_IDS

    return VALID_IDS


def official_scores(gt_files: list[Path], pred_dir: Path, monkeypatch) -> dict:
    """Run cityscapesscripts' evalPixelLevelSemanticLabeling on the files, as its main() does."""
    if not hasattr(np, "in1d"):
        # cityscapesscripts 2.3.0 calls np.in1d (instance-level scores), which NumPy 2.4 removed.
        # np.isin is its documented replacement (same values; the evaluator reshapes the result),
        # so the shim changes nothing it computes. Patched for this test only; pixel IoUs do not
        # depend on it.
        monkeypatch.setattr(np, "in1d", lambda a, b, invert=False: np.isin(a, b, invert=invert).ravel(), raising=False)
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as ev

    args = ev.CArgs()
    args.__dict__.update(ev.args.__dict__)
    args.quiet, args.JSONOutput, args.colorized = True, False, False
    args.bold = args.nocol = ""
    args.predictionPath, args.predictionWalk = str(pred_dir), None
    args.evalInstLevelScore = True  # the default: needs *_gtFine_instanceIds.png beside each labelIds file
    preds = [ev.getPrediction(args, str(gt)) for gt in gt_files]  # the official file-matching rule
    return ev.evaluateImgLists(preds, [str(g) for g in gt_files], args)


def noisy_label_ids(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mostly right, some random labelIds (ignored ids included), some blocks shifted."""
    pred = np.where(rng.random(gt.shape) < 0.55, gt, rng.choice(valid_ids(), gt.shape)).astype(np.uint8)
    return np.roll(pred, 1, axis=1) if rng.random() < 0.5 else pred


@needs_cityscapes
def test_cityscapes_scores_equal_the_official_evaluator(cs, tmp_path, monkeypatch):
    root = tmp_path / "cityscapes"
    build_tree(root, n_per_city={"train": 1, "val": 4, "train_extra": 1}, size=(32, 64), seed=5)
    val = cs.CityscapesDataset(root, cs.scan_split(root, "val"), split="val")
    gt_files = [it.label for it in val.items]
    rng = np.random.default_rng(1)
    # 1) labelId predictions with ignored ids, named as people do: CITY_SEQ_FRAME_leftImg8bit.png
    pred_dir = tmp_path / "pred_label_ids"
    pred_dir.mkdir()
    for it in val.items:
        gt = np.asarray(Image.open(it.label))
        Image.fromarray(noisy_label_ids(gt, rng)).save(pred_dir / f"{it.name}_leftImg8bit.png")
    ours = score_prediction_dir(val, pred_dir)
    official = official_scores(gt_files, pred_dir, monkeypatch)
    assert ours["prediction_ids"] == "label_ids" and ours["images"] == 4
    for name, iou in ours["per_class_iou"].items():
        ref = official["classScores"][name]
        if math.isnan(ref):
            assert iou is None, name
        else:
            assert iou == pytest.approx(100 * ref, abs=1e-9), name
    assert ours["miou"] == pytest.approx(100 * official["averageScoreClasses"], abs=1e-9)
    assert 0 < ours["miou"] < 100
    # 2) our own submission files (train ids -> labelIds), scored both ways
    sub_dir = tmp_path / "submission"
    for it in val.items:
        train = cs.label_ids_to_train_ids(noisy_label_ids(np.asarray(Image.open(it.label)), rng))
        write_cityscapes_prediction(train, f"{it.name}_leftImg8bit", sub_dir, color_dir=tmp_path / "color", size=None)
    ours = score_prediction_dir(val, sub_dir)
    official = official_scores(gt_files, sub_dir, monkeypatch)
    assert ours["miou"] == pytest.approx(100 * official["averageScoreClasses"], abs=1e-9)
    for name, iou in ours["per_class_iou"].items():
        ref = official["classScores"][name]
        assert (iou is None) if math.isnan(ref) else iou == pytest.approx(100 * ref, abs=1e-9)


@needs_cityscapes
def test_cityscapes_train_id_predictions(cs, tmp_path):
    root = tmp_path / "cityscapes"
    build_tree(root, n_per_city={"train": 1, "val": 2, "train_extra": 1})
    val = cs.CityscapesDataset(root, cs.scan_split(root, "val"), split="val")
    for it in val.items:  # perfect predictions as train ids, recognised by name
        write_index_png(val.load_label(val.items.index(it)).numpy(), tmp_path / "p" / f"{it.name}_labelTrainIds.png")
    r = score_prediction_dir(val, tmp_path / "p")
    assert r["prediction_ids"] == "train_ids" and r["miou"] == pytest.approx(100.0) and r["pixel_accuracy"] == 100.0
    # the same files forced to be read as labelIds are mostly wrong
    assert score_prediction_dir(val, tmp_path / "p", ids="label_ids")["miou"] < 50


@needs_cityscapes
def test_submission_export_round_trip(cs, tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 19, (8, 16))
    train[0, :4] = 255
    paths = write_cityscapes_prediction(train, "aachen_000000_000019_leftImg8bit", tmp_path / "ids",
                                        color_dir=tmp_path / "color", size=None)
    assert paths["label_ids"].name == "aachen_000000_000019_labelIds.png"
    assert paths["color"].name == "aachen_000000_000019_color.png"
    label_img = Image.open(paths["label_ids"])
    assert label_img.mode == "L" and label_img.size == (16, 8)
    label_ids = np.asarray(label_img)
    assert label_ids[0, 0] == 0  # ignore -> 'unlabeled'
    assert np.array_equal(cs.label_ids_to_train_ids(label_ids), np.where(train == 255, 255, train))
    from cityscapesscripts.helpers.labels import labels

    ids_of = {label.trainId: label.id for label in labels if 0 <= label.trainId < 255}
    assert label_ids[3, 5] == ids_of[int(train[3, 5])]
    colours = np.asarray(Image.open(paths["color"]))
    classes = cs.cityscapes_classes()
    assert tuple(colours[3, 5]) == classes[int(train[3, 5])].color and tuple(colours[0, 0]) == (0, 0, 0)
    # full resolution: lower-resolution labels are resized (nearest) to 1024x2048 by default
    paths = write_cityscapes_prediction(train, "aachen_000000_000019", tmp_path / "full")
    full = cs.label_ids_to_train_ids(np.asarray(Image.open(paths["label_ids"])))
    assert full.shape == (1024, 2048)
    assert np.array_equal(full[::128, ::128], np.where(train == 255, 255, train))
