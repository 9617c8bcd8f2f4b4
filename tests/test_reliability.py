"""No work lost and a clear message for every user mistake (exit codes in the README's command table)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sclseg.engine.checkpoint as checkpoint_module
from sclseg.cli import EXIT_EVALUATION, EXIT_USAGE, main
from sclseg.config import ConfigError, load_config, resolve_config_path
from sclseg.engine.checkpoint import load_checkpoint
from sclseg.engine.errors import CheckpointWriteFailed
from sclseg.engine.trainer import Trainer

from tiny_config import TINY

DIGITS = resolve_config_path("digits/default")


def _folder_data(root: Path, *, bad_val_mask: bool) -> Path:
    """A folder dataset of 16x16 scenes with 3 classes; optionally one val mask holds the value 7."""
    rng = np.random.default_rng(0)
    for split, count in (("", 6), ("val", 2)):
        for i in range(count):
            folder = root / split if split else root
            (folder / "images").mkdir(parents=True, exist_ok=True)
            (folder / "masks").mkdir(parents=True, exist_ok=True)
            mask = rng.integers(0, 3, (16, 16)).astype(np.uint8)
            if split == "val" and i == 1 and bad_val_mask:
                mask[0, 0] = 7
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "images" / f"s{i}.png")
            Image.fromarray(mask).save(folder / "masks" / f"s{i}.png")
    config = root / "config.yaml"
    config.write_text(
        f"data:\n  name: folder\n  root: {root}\n  crop_size: [16, 16]\n  batch_size: 2\n  folder:\n"
        "    classes: [background, a, b]\nmodel:\n  name: compact\n  width: 8\nmethod:\n  name: supervised\n"
        "train:\n  threads: 1\n"
    )
    return config


# ------------------------------------------------------------------ 1. an evaluation failure keeps the step
def test_a_failing_evaluation_keeps_its_steps_checkpoint_and_says_how_to_resume(tmp_path, capsys) -> None:
    config = _folder_data(tmp_path / "data", bad_val_mask=True)
    out = tmp_path / "run"
    code = main(["train", str(config), "--out", str(out), "train.iterations=4", "train.eval_interval=3",
                 "train.checkpoint_interval=3", "train.log_interval=1"])
    err = capsys.readouterr().err
    assert code == EXIT_EVALUATION, err
    assert (out / "step_3.pt").is_file() and load_checkpoint(out / "step_3.pt")["iteration"] == 3
    assert "evaluation at step 3 failed" in err and "s1.png" in err
    assert f"resume with: sclseg train {out / 'config.yaml'} --out {out} --resume" in err


def test_an_evaluation_failing_between_checkpoints_writes_the_step(tmp_path, capsys) -> None:
    config = _folder_data(tmp_path / "data", bad_val_mask=True)
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "train.iterations=4", "train.eval_interval=2",
                 "train.checkpoint_interval=4"]) == EXIT_EVALUATION
    assert sorted(p.name for p in out.glob("step_*.pt")) == ["step_2.pt"]


# ------------------------------------------------------------------ 2. the dry run checks what it promises
def test_the_dry_run_reports_a_bad_mask_among_many_and_quick_skips_the_file_check(tmp_path, capsys) -> None:
    config = _folder_data(tmp_path / "data", bad_val_mask=True)
    assert main(["train", str(config), "--out", str(tmp_path / "r"), "--dry-run"]) == EXIT_USAGE
    assert "s1.png" in capsys.readouterr().err
    # --quick skips the file check, but the dry run's evaluation of one val image still runs (s0 is good)
    assert main(["train", str(config), "--out", str(tmp_path / "q"), "--dry-run", "--quick"]) == 0
    records = [json.loads(line) for line in (tmp_path / "q" / "dry_run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "eval"]


# ------------------------------------------------------------------ 4./5. messages instead of tracebacks
@pytest.mark.parametrize("override, key", [
    ("train.device=foo", "train.device"),
    ("data.crop_size=[0,0]", "data.crop_size"),
    ("data.scale_range=[2,1]", "data.scale_range"),
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.momentum=-0.5", "optim.momentum"),
    ("method.box_area=0", "method.box_area"),
    ("method.max_pairs=0", "method.max_pairs"),
    ("method.lambda_c=-1", "method.lambda_c"),
    ("method.lambda_sc=-1", "method.lambda_sc"),
    ("method.confidence=1.5", "method.confidence"),
    ("eval.scales=[]", "eval.scales"),
    ("eval.scales=[0]", "eval.scales"),
    ("eval.tile=[0,0]", "eval.tile"),
])
def test_out_of_range_settings_are_refused_at_config_load_naming_the_key(override, key) -> None:
    override_pattern = override.replace("[", ".").replace("]", ".")
    with pytest.raises(ConfigError, match=rf"^command-line override \({override_pattern}\): "
                                          rf"{key.replace('.', '[.]')}: expected"):
        load_config(DIGITS, [override])


def test_a_mistake_in_the_file_is_blamed_on_the_file_and_one_on_the_command_line_on_it(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  lambda_c: -3\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: method.lambda_c: expected >= 0"):
        load_config(bad, ["train.iterations=5"])
    with pytest.raises(ConfigError, match=r"^command-line override \(train.iterations=0\): train.iterations"):
        load_config(DIGITS, ["train.iterations=0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_a_one_line_error(tmp_path, capsys) -> None:
    assert main(["train", "digits/default", "--out", str(tmp_path / "r"), *TINY, "train.device=cuda"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.device" in err[0] and "no GPU" in err[0]


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tmp_path, capsys, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sclseg.engine.trainer.build_data", interrupted)
    assert main(["train", "digits/default", "--out", str(tmp_path / "r"), *TINY]) == 130
    assert "interrupted" in capsys.readouterr().err


# ------------------------------------------------------------------ disk full
def _full_disk(monkeypatch) -> None:
    """Temporary checkpoint files go to /dev/full, whose writes fail with ENOSPC, as on a full disk."""
    real_open = open

    def opener(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(".tmp"):
            return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "open", opener, raising=False)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_keeps_the_older_checkpoints_and_says_no_space_left(tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "run"
    cfg = load_config(DIGITS, [*TINY, "train.iterations=4", "train.checkpoint_interval=1", "train.keep_last=5"])
    Trainer(cfg, out, show_progress=False).run(until=2)
    _full_disk(monkeypatch)
    with pytest.raises(CheckpointWriteFailed, match=r"step_3\.pt: no space left on device /"):
        Trainer(cfg, out, show_progress=False, resume=True).run()
    assert sorted(p.name for p in out.glob("step_*.pt")) == ["step_1.pt", "step_2.pt"]
    assert load_checkpoint(out / "step_2.pt")["iteration"] == 2  # intact
    assert not list(out.glob(".*.tmp"))
    assert main(["train", "digits/default", "--out", str(tmp_path / "cli"), *TINY, "train.iterations=1"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no space left on device" in err and "Traceback" not in err


# ------------------------------------------------------------------ 6. --resume before or after overrides
def test_resume_works_before_and_after_the_overrides(tmp_path) -> None:
    out = tmp_path / "run"
    base = ["train", "digits/default", "--out", str(out), *TINY, "train.checkpoint_interval=1"]
    assert main([*base, "train.iterations=2"]) == 0
    assert main([*base, "--resume", "train.iterations=3"]) == 0  # the override is not taken for a path
    assert main([*base, "train.iterations=4", "--resume"]) == 0
    assert load_checkpoint(out / "step_4.pt")["iteration"] == 4


# ------------------------------------------------------------------ 8. smaller items
def test_evaluating_the_student_does_not_overwrite_the_teachers_result(tmp_path) -> None:
    out = tmp_path / "run"
    assert main(["train", "digits/default", "--out", str(out), *TINY, "train.iterations=1"]) == 0
    ckpt = str(out / "step_1.pt")
    assert main(["evaluate", "digits/default", *TINY, "--checkpoint", ckpt]) == 0
    assert main(["evaluate", "digits/default", *TINY, "--checkpoint", ckpt, "--student"]) == 0
    teacher, student = (json.loads((out / name).read_text()) for name in ("eval_val.json", "eval_val_student.json"))
    assert teacher["weights"] == "teacher" and student["weights"] == "student"


def test_a_stopped_and_resumed_run_logs_every_step_once(tmp_path) -> None:
    out = tmp_path / "run"
    cfg = load_config(DIGITS, [*TINY, "train.iterations=6", "train.log_interval=2", "train.eval_interval=3",
                               "train.checkpoint_interval=3"])
    Trainer(cfg, out, show_progress=False).run(until=3)
    Trainer(cfg, out, show_progress=False, resume=True).run()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seen = [(r["kind"], r["iteration"]) for r in records]
    assert seen == [("train", 2), ("train", 3), ("eval", 3), ("resume", 3), ("train", 4), ("train", 6), ("eval", 6)]


def test_the_best_score_of_a_resumed_run_counts_the_evaluation_of_its_checkpoints_step(tmp_path) -> None:
    """step_N.pt is written before step N is evaluated; the resumed run still knows that evaluation."""
    out = tmp_path / "run"
    cfg = load_config(DIGITS, [*TINY, "train.iterations=4", "train.eval_interval=2", "train.checkpoint_interval=2"])
    Trainer(cfg, out, show_progress=False).run(until=2)
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    resumed = Trainer(cfg, out, show_progress=False, resume=True)
    assert resumed.state.best == {"miou": first[0]["miou"], "iteration": 2}
