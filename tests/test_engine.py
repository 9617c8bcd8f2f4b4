"""The engine end to end on a tiny budget: CLI train/evaluate/predict, the step, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sclseg.cli import main
from sclseg.config import load_config, resolve_config_path
from sclseg.data import build_data
from sclseg.data.digits import DIGIT_CLASSES
from sclseg.engine.optim import build_optimizer
from sclseg.models import create_model

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
    code = main(["evaluate", "digits/default", "--checkpoint", str(trained_run / "step_4.pt"), "--out", str(out),
                 *TINY])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["miou"] == pytest.approx(last["teacher_miou"], abs=1e-9)
    assert set(result["per_class_iou"]) == {c.name for c in DIGIT_CLASSES}
    student_out = tmp_path / "student.json"
    main(["evaluate", "digits/default", "--checkpoint", str(trained_run / "step_4.pt"), "--student",
          "--out", str(student_out), *TINY])
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
