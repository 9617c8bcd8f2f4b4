"""The engine end to end on a tiny budget: CLI train/evaluate/predict, the step, metrics."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sclseg.cli import main
from sclseg.config import ConfigError, load_config, resolve_config_path
from sclseg.cutmix import BoxMaskGenerator, mix
from sclseg.data import build_data
from sclseg.data.digits import DIGIT_CLASSES
from sclseg.engine.optim import build_optimizer
from sclseg.engine.step import compute_loss, train_step, unlabeled_weight
from sclseg.losses import structured_consistency_loss
from sclseg.metrics import ConfusionMatrix
from sclseg.models import create_model
from sclseg.teacher import MeanTeacher
from tiny_config import TINY as SHARED_TINY

TINY = [
    *SHARED_TINY,
    "train.iterations=4",
    "train.eval_interval=2",
    "train.log_interval=2",
    "train.checkpoint_interval=2",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "digits/default", "--out", str(out), *TINY]) == 0
    return out


def test_train_writes_checkpoints_metrics_and_resolved_config(trained_run: Path) -> None:
    files = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "best.pt", "final.json", "step_4.pt", "step_2.pt"} <= files
    resolved = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert resolved["train"]["iterations"] == 4 and resolved["method"]["name"] == "scl"
    assert resolved["method"]["lambda_c"] == load_config(resolve_config_path("digits/default")).method.lambda_c
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["iteration"] for r in train_records] == [2, 4]
    assert {"loss", "loss_x", "loss_c", "loss_sc", "lr", "it_per_s"} <= train_records[0].keys()
    assert [r["iteration"] for r in evals] == [2, 4]
    assert all(0.0 <= r["teacher_miou"] <= 100.0 for r in evals)


def test_evaluate_reproduces_the_last_evaluation(trained_run: Path, tmp_path: Path) -> None:
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "eval"][-1]
    out = tmp_path / "eval.json"
    code = main(["evaluate", "digits/default", "--checkpoint", str(trained_run / "step_4.pt"), "--out", str(out), *TINY])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["miou"] == pytest.approx(last["teacher_miou"], abs=1e-9)
    assert set(result["per_class_iou"]) == {c.name for c in DIGIT_CLASSES}
    student_out = tmp_path / "student.json"
    main(["evaluate", "digits/default", "--checkpoint", str(trained_run / "step_4.pt"), "--student", "--out", str(student_out), *TINY])
    assert json.loads(student_out.read_text())["miou"] == pytest.approx(last["student_miou"], abs=1e-9)


def test_predict_writes_label_pngs_of_the_input_size_with_the_palette(trained_run: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(inputs / "a.png")
    Image.fromarray(rng.integers(0, 255, (33, 21, 3), dtype=np.uint8)).save(inputs / "b.jpg")
    out = tmp_path / "pred"
    assert main(["predict", str(inputs), "--checkpoint", str(trained_run / "best.pt"), "--out", str(out)]) == 0
    for stem, size in (("a", (52, 40)), ("b", (21, 33))):
        label = Image.open(out / f"{stem}_labels.png")
        assert label.mode == "P" and label.size == size
        assert np.asarray(label).max() < len(DIGIT_CLASSES)
        palette = np.asarray(label.getpalette()[: 3 * len(DIGIT_CLASSES)]).reshape(-1, 3)
        assert [tuple(c) for c in palette] == [c.color for c in DIGIT_CLASSES]
        assert Image.open(out / f"{stem}_overlay.png").size == (2 * size[0], size[1])
    listing = json.loads((out / "predictions.json").read_text())
    assert len(listing["files"]) == 2


def test_unknown_config_key_names_the_nearest_valid_key(tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match=r"method\.lambda_sc"):
        load_config(resolve_config_path("digits/default"), ["method.lambda_sx=2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  iteratons: 3\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "train.iteratons" in err and "train.iterations" in err


def test_wrong_value_type_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.iterations: expected an integer"):
        load_config(None, ["train.iterations=ten"])
    with pytest.raises(ConfigError, match=r"method\.name: expected one of"):
        load_config(None, ["method.name=mixmatch"])


def _tiny_setup(method: str):
    cfg = load_config(resolve_config_path("digits/default"), [*TINY, f"method.name={method}"])
    data = build_data(cfg)
    torch.manual_seed(0)
    model = create_model(cfg.model, data.num_classes)
    images = torch.stack([data.labeled[i]["image"] for i in range(4)])
    labels = torch.stack([data.labeled[i]["mask"] for i in range(4)])
    unlabeled = torch.stack([data.unlabeled[i]["image"] for i in range(4)])
    return cfg, model, images, labels, unlabeled


@pytest.mark.parametrize("method", ["supervised", "cl", "scl"])
def test_step_lowers_its_loss_on_a_fixed_batch(method: str) -> None:
    cfg, model, images, labels, unlabeled = _tiny_setup(method)
    teacher = MeanTeacher(model, 0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    masks = BoxMaskGenerator(cfg.method.n_boxes)

    def loss_at_fixed_seed() -> float:
        model.train()
        with torch.no_grad():
            loss, _ = compute_loss(model, teacher.teacher, images, labels, unlabeled, method=cfg.method,
                                   mask_generator=masks, generator=torch.Generator().manual_seed(7))
        return float(loss)

    before = loss_at_fixed_seed()
    for _ in range(15):
        loss, terms = compute_loss(model, teacher.teacher, images, labels, unlabeled, method=cfg.method,
                                   mask_generator=masks, generator=torch.Generator().manual_seed(7))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        teacher.update(model)
    assert set(terms) == {"supervised": {"loss", "loss_x"}, "cl": {"loss", "loss_x", "loss_c"},
                          "scl": {"loss", "loss_x", "loss_c", "loss_sc"}}[method]
    assert loss_at_fixed_seed() < before


def test_unlabeled_weight_warm_up_and_ramp() -> None:
    cfg = load_config(None, ["method.unlabeled_start=10", "method.rampup_iters=100"])
    assert unlabeled_weight(cfg.method, 5) == 0.0
    assert unlabeled_weight(cfg.method, 10) == pytest.approx(np.exp(-5.0))
    assert unlabeled_weight(cfg.method, 60) == pytest.approx(np.exp(-5.0 * 0.25))
    assert unlabeled_weight(cfg.method, 500) == 1.0
    cfg.method.name = "supervised"
    assert unlabeled_weight(cfg.method, 500) == 0.0


@pytest.mark.parametrize("nesterov", [False, True])
def test_optimizer_matches_the_per_parameter_sgd_bit_for_bit_and_decays_poly(nesterov: bool) -> None:
    cfg = load_config(None, ["model.width=8", "optim.lr=0.1", "optim.poly_power=0.9", "optim.weight_decay=0.001",
                             f"optim.nesterov={str(nesterov).lower()}"])
    torch.manual_seed(0)
    ours, plain = create_model(cfg.model, 11), create_model(cfg.model, 11)
    plain.load_state_dict(ours.state_dict())
    optimizer, scheduler = build_optimizer(ours.parameters(), cfg.optim, iterations=10)
    o = cfg.optim
    reference = torch.optim.SGD(plain.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                nesterov=nesterov, foreach=False)
    generator = torch.Generator().manual_seed(1)
    lrs = []
    for step in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        for group in reference.param_groups:
            group["lr"] = o.lr * (1 - step / 10) ** 0.9  # poly, worked by hand
        for a, b in zip(ours.parameters(), plain.parameters()):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        optimizer.step()
        scheduler.step()
        reference.step()
    assert lrs == pytest.approx([0.1 * (1 - k / 10) ** 0.9 for k in range(10)])
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), plain.parameters()))


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


def test_scoring_predict_output_equals_model_evaluation(trained_run: Path, tmp_path: Path) -> None:
    cfg = load_config(resolve_config_path("digits/default"), TINY)
    val = build_data(cfg).eval_splits["val"]
    images = tmp_path / "val_images"
    images.mkdir()
    for i in range(len(val)):
        sample = val[i]
        rgb = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(rgb).save(images / f"{sample['name']}.png")
    preds = tmp_path / "preds"
    ckpt = str(trained_run / "step_4.pt")
    assert main(["predict", str(images), "--checkpoint", ckpt, "--out", str(preds)]) == 0
    model_json, files_json = tmp_path / "model.json", tmp_path / "files.json"
    assert main(["evaluate", "digits/default", "--checkpoint", ckpt, "--out", str(model_json), *TINY]) == 0
    assert main(["evaluate", "digits/default", "--predictions", str(preds), "--out", str(files_json), *TINY]) == 0
    from_model, from_files = json.loads(model_json.read_text()), json.loads(files_json.read_text())
    assert from_files["eval_mode"] == "files" and from_files["images"] == len(val)
    assert from_files["miou"] == pytest.approx(from_model["miou"], abs=1e-9)
    assert main(["evaluate", "digits/default", *TINY]) == 2  # neither --checkpoint nor --predictions


def test_exponent_floats_without_a_dot_are_numbers() -> None:
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)


def test_confidence_threshold_masks_the_pixel_consistency() -> None:
    cfg, model, images, labels, unlabeled = _tiny_setup("cl")
    teacher = MeanTeacher(model, 0.9)
    masks = BoxMaskGenerator(cfg.method.n_boxes)

    def loss_c(confidence):
        cfg.method.confidence = confidence
        model.eval()  # deterministic forward passes
        _, terms = compute_loss(model, teacher.teacher, images, labels, unlabeled, method=cfg.method,
                                mask_generator=masks, generator=torch.Generator().manual_seed(3))
        return float(terms["loss_c"])

    assert loss_c(0.0) == pytest.approx(loss_c(None))  # every top probability exceeds 0
    assert loss_c(1.0) == 0.0  # no pixel is that confident: the term is empty


def test_sc_confident_only_drops_the_unconfident_pixels_from_every_region() -> None:
    cfg, model, images, labels, unlabeled = _tiny_setup("scl")
    teacher = MeanTeacher(model, 0.9)
    masks = BoxMaskGenerator(cfg.method.n_boxes)
    cfg.method.max_pairs = None  # every pair: the loss is a function of the regions alone
    model.eval()

    def loss_sc(confidence, only):
        cfg.method.confidence, cfg.method.sc_confident_only = confidence, only
        _, terms = compute_loss(model, teacher.teacher, images, labels, unlabeled, method=cfg.method,
                                mask_generator=masks, generator=torch.Generator().manual_seed(3))
        return float(terms["loss_sc"])

    # by hand: the same owner map and maps, with the pixels under the threshold given owner -1
    owner = masks(unlabeled.shape[0], *unlabeled.shape[-2:], torch.Generator().manual_seed(3), device=unlabeled.device)
    with torch.no_grad():
        probs = teacher.teacher(unlabeled).float().softmax(1)
        target = mix(probs, probs.roll(1, 0), owner)
        student = model(mix(unlabeled, unlabeled.roll(1, 0), owner)).float().softmax(1)
    threshold = float(target.amax(1).median())
    kept = owner.masked_fill(target.amax(1) <= threshold, -1)
    by_hand = structured_consistency_loss(student, target, kept, n_boxes=cfg.method.n_boxes,
                                          last_boxes=cfg.method.last_boxes, max_pairs=None)
    assert loss_sc(threshold, True) == pytest.approx(float(by_hand), rel=1e-5)
    assert loss_sc(threshold, False) == pytest.approx(loss_sc(None, False))  # the mask alone leaves L_sc as it is
    assert loss_sc(threshold, True) != pytest.approx(loss_sc(threshold, False))
    with pytest.raises(ConfigError, match="method.sc_confident_only"):
        load_config(None, ["method.sc_confident_only=true"])


def test_dry_run_builds_everything_and_runs_one_step(tmp_path: Path) -> None:
    assert main(["train", "digits/default", "--out", str(tmp_path / "r"), "--dry-run", *TINY]) == 0
    run = tmp_path / "r" / "dry_run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "eval"] and records[0]["iteration"] == 1
    assert "loss_sc" in records[0]
    # strict JSON: no NaN/Infinity anywhere in what the run wrote
    strict = lambda text: json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))  # noqa: E731
    final = strict((run / "final.json").read_text())
    assert final["best"]["iteration"] == 1 and final["last_eval"]["split"] == "val"
    for line in (run / "metrics.jsonl").read_text().splitlines():
        strict(line)


def test_pair_sampling_reaches_the_structured_loss() -> None:
    cfg, model, images, labels, unlabeled = _tiny_setup("scl")
    teacher = MeanTeacher(model, 0.9)
    cfg.method.max_pairs = 4  # every region larger than 2 pixels is sampled
    masks = BoxMaskGenerator(cfg.method.n_boxes)
    model.train()  # batch statistics: the untrained student's maps differ from its eval-mode copy's

    def loss_sc(sampling: str) -> float:
        cfg.method.pair_sampling = sampling
        torch.manual_seed(0)  # the same dropout for both
        _, terms = compute_loss(model, teacher.teacher, images, labels, unlabeled, method=cfg.method,
                                mask_generator=masks, generator=torch.Generator().manual_seed(3))
        return float(terms["loss_sc"])

    pairs, pixels = loss_sc("pairs"), loss_sc("pixels")
    assert pairs > 0 and pixels > 0 and pairs != pixels  # the two estimators draw differently
    with pytest.raises(ConfigError, match="method.pair_sampling"):
        load_config(None, ["method.pair_sampling=boxes"])


def test_student_as_teacher_trains_as_a_zero_decay_ema_and_keeps_the_ema_for_evaluation() -> None:
    """``method.teacher: student`` guesses labels with the student in eval mode; the student it
    trains is, bit for bit, the one an EMA of decay 0 (an exact copy) trains, and the EMA of the
    configured decay is still kept, apart from it."""
    cfg, model, images, labels, unlabeled = _tiny_setup("scl")
    batch, ubatch = {"image": images, "mask": labels}, {"image": unlabeled}

    def train(teacher: str, decay: float) -> tuple[torch.nn.Module, MeanTeacher]:
        cfg.method.teacher = teacher
        student = copy.deepcopy(model)
        mean_teacher = MeanTeacher(student, decay)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        masks, generator = BoxMaskGenerator(cfg.method.n_boxes), torch.Generator().manual_seed(5)
        torch.manual_seed(0)  # the decoder's dropout draws from the global generator
        for _ in range(3):
            train_step(student, mean_teacher, optimizer, scheduler, [batch], [ubatch], method=cfg.method,
                       mask_generator=masks, generator=generator)
        assert student.training  # the teacher's eval-mode pass leaves the student in train mode
        return student, mean_teacher

    own, kept = train("student", 0.9)
    copied, _ = train("ema", 0.0)
    own_state, copied_state = own.state_dict(), copied.state_dict()
    assert all(torch.equal(own_state[k], copied_state[k]) for k in own_state)
    ema_state = kept.teacher.state_dict()
    assert any(not torch.equal(ema_state[k], own_state[k]) for k in own_state if own_state[k].is_floating_point())
    with pytest.raises(ConfigError, match="method.teacher"):
        load_config(None, ["method.teacher=previous"])
