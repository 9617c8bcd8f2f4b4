"""``sclseg demo`` / ``compare`` end to end on a budget of seconds: the summary and its paired statistics,
the figures, rebuilding from the run folders, and the shared warm-up changes nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from sclseg.cli import main
from sclseg.config import load_config, resolve_config_path
from sclseg.data import build_data
from sclseg.engine.checkpoint import load_checkpoint
from sclseg.engine.trainer import Trainer

from tiny_config import TINY

DEMO = [*TINY, "train.iterations=6", "train.eval_interval=3", "train.log_interval=1", "method.unlabeled_start=2",
        "method.n_boxes=4", "method.last_boxes=2", "method.ema_decay=0.5"]


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _paired_by_hand(later: dict, earlier: dict) -> tuple[dict, float, list]:
    """Per-seed differences, their mean and, for two seeds, mean ± t_{0.975,1} * |d0 - d1| / 2
    (sd = |d0 - d1| / sqrt(2), so t * sd / sqrt(2) = t * |d0 - d1| / 2; t_{0.975,1} = 12.706205)."""
    diff = {seed: later[seed] - earlier[seed] for seed in later}
    d0, d1 = diff["0"], diff["1"]
    mean, half = (d0 + d1) / 2, 12.706205 * abs(d0 - d1) / 2
    return diff, mean, [mean - half, mean + half]


@pytest.mark.slow
def test_demo_trains_every_method_and_writes_the_table_and_figure(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "0", "1", *DEMO]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["runs"]) == ["supervised", "cl", "scl"] and summary["seeds"] == [0, 1]
    per_seed = {}
    for method, run in summary["runs"].items():
        tests = {s: json.loads((out / f"{method}_seed{s}" / "eval_test.json").read_text()) for s in "01"}
        per_seed[method] = {s: t["miou"] for s, t in tests.items()}
        assert run["per_seed"] == per_seed[method] and run["n"] == 2
        assert run["miou"] == pytest.approx(sum(per_seed[method].values()) / 2)
        assert run["std"] == pytest.approx(abs(per_seed[method]["0"] - per_seed[method]["1"]) / 2**0.5)
        assert all(0.0 <= v <= 100.0 for v in per_seed[method].values())
        assert summary["boundary"]["runs"][method]["per_seed"] == {s: t["boundary_miou"] for s, t in tests.items()}
    assert list(summary["paired"]) == ["cl-supervised", "scl-supervised", "scl-cl"]
    for pair, stat in summary["paired"].items():
        later, earlier = pair.split("-")
        diff, mean, ci = _paired_by_hand(per_seed[later], per_seed[earlier])
        assert stat["per_seed"] == diff and stat["n"] == 2
        assert stat["mean"] == pytest.approx(mean) and stat["ci95"] == pytest.approx(ci, abs=1e-6)
        assert stat["contains_zero"] == (ci[0] <= 0 <= ci[1])
    assert len({tuple(d["per_seed"].values()) for d in summary["paired"].values()}) > 1  # the methods differ
    assert summary["split"] == "test" and summary["images"] == 6 and summary["shared_warm_up"] == 2
    assert summary["iterations"] == 6 and summary["boundary"]["width"] == 3

    table = (out / "summary.md").read_text()
    for text in (table, printed):
        assert "| scl − supervised | " in text and "| scl | " in text and "Boundary band" in text
        verdicts = [d["verdict"] for d in summary["paired"].values()]
        assert all(f"| {v} |" in text for v in verdicts)
    assert "inside the seed noise" in table or "excludes 0" in table

    # learning curves: the val mIoU of the eval records, mean and min-max over the two seeds
    curves = summary["learning_curves"]
    assert curves["split"] == "val"
    for method in summary["methods"]:
        evals = [{r["iteration"]: r["miou"] for r in _records(out / f"{method}_seed{s}" / "metrics.jsonl")
                  if r["kind"] == "eval"} for s in "01"]
        curve = curves["methods"][method]
        assert curve["step"] == [3, 6] and curve["n"] == [2, 2]
        assert curve["mean"] == pytest.approx([(evals[0][k] + evals[1][k]) / 2 for k in (3, 6)])
        assert curve["min"] == [min(evals[0][k], evals[1][k]) for k in (3, 6)]
        assert curve["max"] == [max(evals[0][k], evals[1][k]) for k in (3, 6)]
    with Image.open(out / "learning_curves.png") as figure:
        assert figure.size == (640, 400)
    # image | supervised | cl | scl | ground truth for each of the 6 test scenes: 32-pixel tiles
    # drawn 3x with 4-pixel gaps under a 16-pixel header
    with Image.open(out / "comparison.png") as figure:
        assert figure.size == (5 * (3 * 32 + 4) + 4, 16 + 6 * (3 * 32 + 4) + 4)
    assert not list(out.glob(".warmup_*"))  # the warm-up snapshots are removed

    # the summary is rebuilt from the run folders alone
    written = {name: (out / name).read_text() for name in ("summary.json", "summary.md")}
    for name in ("summary.json", "summary.md", "learning_curves.png", "comparison.png"):
        (out / name).unlink()
    assert main(["compare", "--summarize", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text()) == json.loads(written["summary.json"])
    assert (out / "summary.md").read_text() == written["summary.md"] and (out / "learning_curves.png").is_file()

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


def test_compare_a_variant_on_another_split_and_merge_folders(tmp_path, capsys) -> None:
    # a variant is one more entry with its own overrides; it trains alone (no shared warm-up)
    out = tmp_path / "cmp"
    student = "sup_student: method.name=supervised eval.use_teacher=false"
    args = ["compare", "digits/default", "--methods", "supervised", "--variant", student, "--split", "val",
            *TINY, "train.iterations=2", "train.eval_interval=2"]
    assert main([*args, "--seeds", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"] == ["supervised", "sup_student"] and summary["split"] == "val"
    assert summary["weights"] == {"supervised_seed3": "teacher (EMA)", "sup_student_seed3": "student"}
    runs = {m: json.loads((out / f"{m}_seed3" / "eval_val.json").read_text()) for m in summary["methods"]}
    assert runs["sup_student"]["overrides"][-1] == "eval.use_teacher=false"
    assert runs["sup_student"]["shared_warm_up"] == 0
    paired_gap = runs["sup_student"]["miou"] - runs["supervised"]["miou"]
    assert summary["paired"]["sup_student-supervised"]["per_seed"] == {"3": paired_gap}
    assert summary["paired"]["sup_student-supervised"]["ci95"] is None  # one seed
    assert "one seed: no interval" in capsys.readouterr().out

    # seeds run by another process into their own folder merge by copying the run folders
    other = tmp_path / "other"
    assert main([*args, "--seeds", "4", "--out", str(other)]) == 0
    for folder in other.glob("*_seed4"):
        shutil.copytree(folder, out / folder.name)
    assert main(["compare", "--summarize", str(out)]) == 0
    merged = json.loads((out / "summary.json").read_text())
    assert merged["seeds"] == [3, 4] and merged["paired"]["sup_student-supervised"]["n"] == 2
    other_summary = json.loads((other / "summary.json").read_text())
    assert merged["runs"]["supervised"]["per_seed"]["4"] == other_summary["runs"]["supervised"]["miou"]


def test_compare_usage_errors(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    cases = [
        (["compare"], "compare needs CONFIG"),
        (["compare", "--summarize", str(tmp_path / "empty")], "no <label>_seed<k>/eval_<split>.json"),
        (["compare", "--summarize", str(tmp_path / "missing")], "no folder"),
        (["compare", "digits/default", "--variant", "no colon"], "--variant 'no colon'"),
        (["compare", "digits/default", "--variant", "a-b: method.name=cl"], "no '-'"),
        (["compare", "digits/default", "--methods", "nosuchmethod"], "--methods: unknown ['nosuchmethod']"),
        (["demo", "--seeds", "zero"], "--seeds: expected integers"),
        (["compare", "digits/default", "--methods", "--variant", "cl: method.name=cl", "--split", "nope", *TINY,
          "--out", str(tmp_path / "x")], "--split nope: not available"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_runs_on_worker_processes_write_the_same_weights_as_runs_one_after_the_other(tmp_path) -> None:
    """``--jobs 2``: warm-ups first, then every run resumes from its group's snapshot in a worker
    process; an exact resume, so every run's final weights equal the sequential comparison's."""
    args = ["compare", "digits/default", "--methods", "supervised", "scl", "fixmatch", "--seeds", "0", "1", *TINY,
            "train.iterations=6", "method.unlabeled_start=2", "train.eval_interval=6", "train.checkpoint_interval=6"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    for run in sorted((tmp_path / "one").glob("*_seed*")):
        one, two = load_checkpoint(run / "step_6.pt"), load_checkpoint(tmp_path / "two" / run.name / "step_6.pt")
        for role in ("student", "teacher"):
            assert all(torch.equal(one[role][k], two[role][k]) for k in one[role]), (run.name, role)
    assert not list((tmp_path / "two").glob(".warmup_*"))  # the snapshots are gone
    assert main([*args, "--out", str(tmp_path / "bad"), "--jobs", "0"]) == 2
