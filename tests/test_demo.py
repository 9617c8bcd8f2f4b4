"""``sclseg demo`` end to end on a budget of seconds: outputs, and the shared warm-up changes nothing."""

from __future__ import annotations

import json

import torch
from PIL import Image

from sclseg.cli import main
from sclseg.config import resolve_config_path
from sclseg.config import load_config
from sclseg.data import build_data
from sclseg.engine.checkpoint import load_checkpoint
from sclseg.engine.trainer import Trainer
from tiny_config import TINY

DEMO = [*TINY, "train.iterations=6", "train.eval_interval=3", "train.log_interval=1", "method.unlabeled_start=2",
        "method.n_boxes=4", "method.last_boxes=2"]


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_demo_trains_every_method_and_writes_the_table_and_figure(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *DEMO]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["runs"]) == ["supervised", "cl", "scl"]
    for method, run in summary["runs"].items():
        test = json.loads((out / f"{method}_seed0" / "eval_test.json").read_text())
        assert run["miou"] == test["miou"] and run["per_seed"] == {"0": test["miou"]} and run["std"] == 0.0
        assert 0.0 <= run["miou"] <= 100.0
    assert summary["split"] == "test" and summary["test_images"] == 6 and summary["shared_warm_up"] == 2
    assert "| scl |" in (out / "summary.md").read_text() and "| scl |" in capsys.readouterr().out
    # image | supervised | cl | scl | ground truth for each of the 6 test scenes: 32-pixel tiles
    # drawn 3x with 4-pixel gaps under a 16-pixel header
    with Image.open(out / "comparison.png") as figure:
        assert figure.size == (5 * (3 * 32 + 4) + 4, 16 + 6 * (3 * 32 + 4) + 4)
    assert not list(out.glob("warmup_seed*"))  # the warm-up snapshot is removed

    # the semi-supervised runs resumed the supervised warm-up: its records up to step 2, then their own
    sup = _records(out / "supervised_seed0" / "metrics.jsonl")
    scl = _records(out / "scl_seed0" / "metrics.jsonl")
    train = lambda rs, upto: [r["loss"] for r in rs if r["kind"] == "train" and r["iteration"] <= upto]  # noqa: E731
    assert train(scl, 2) == train(sup, 2)
    assert [r["iteration"] for r in scl if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["iteration"] for r in scl if r["kind"] == "resume"] == [2]
    assert [("loss_sc" in r) for r in scl if r["kind"] == "train"] == [False, False, True, True, True, True]

    # ... and end exactly where an scl run of its own ends
    cfg = load_config(resolve_config_path("digits/default"), [*DEMO, "method.name=scl"])
    alone = tmp_path / "alone"
    Trainer(cfg, alone, data=build_data(cfg), show_progress=False).run()
    ours, theirs = load_checkpoint(out / "scl_seed0" / "step_6.pt"), load_checkpoint(alone / "step_6.pt")
    for key in ("student", "teacher"):
        assert all(torch.equal(ours[key][name], theirs[key][name]) for name in theirs[key])
