"""Runs that cannot clobber each other, resumes that take the user's fix, stops that name a whole checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sclseg.cli import EXIT_USAGE, main
from sclseg.config import load_config, resolve_config_path
from sclseg.engine.checkpoint import load_checkpoint
from sclseg.engine.run_dir import RunFolder, RunLock
from sclseg.engine.trainer import Trainer

from tiny_config import TINY

DIGITS = resolve_config_path("digits/default")


def _holder(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until it is killed (it prints 'held' once it does)."""
    code = ("import sys, time; from pathlib import Path; from sclseg.engine.run_dir import RunLock; "
            "RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_a_second_start_into_a_held_folder_is_refused_naming_the_folder_and_the_holder(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        code = main(["train", "digits/default", "--out", str(out), *TINY, "train.iterations=2"])
        err = capsys.readouterr().err
        assert code == EXIT_USAGE, err
        assert str(out) in err and f"process {holder.pid}" in err and "Traceback" not in err
        assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing anything: its lock does not block the next start
    assert main(["train", "digits/default", "--out", str(out), *TINY, "train.iterations=2",
                 "train.eval_interval=2"]) == 0


@pytest.mark.slow
def test_two_trains_started_together_one_runs_and_the_other_is_refused(tmp_path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "sclseg", "train", "digits/default", "--out", str(out), *TINY,
               "train.iterations=3", "train.eval_interval=3", "train.log_interval=1"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=300)]]
    codes = sorted(code for code, _ in results)
    assert codes == [0, EXIT_USAGE], results
    refused = next(err for code, err in results if code == EXIT_USAGE)
    assert "is in use by another sclseg run (process" in refused
    steps = [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3]  # one run's records, none interleaved


@pytest.mark.slow
def test_the_lock_is_reentrant_in_one_process_and_released_on_close(tmp_path) -> None:
    folder = RunFolder(tmp_path / "run", main=True)
    again = RunLock(tmp_path / "run")
    again.acquire()  # the same process may open its own folder twice (a resume after a stop)
    again.release()
    folder.close()
    probe = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from sclseg.engine.run_dir import RunLock; RunLock(Path(sys.argv[1])).acquire()",
                            str(tmp_path / "run")], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr


def test_temporary_files_of_a_killed_writer_are_removed_and_a_live_writers_kept(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        orphan = out / f".step_4.pt.{dead.pid}.tmp"
        orphan.write_bytes(b"x" * 4096)
        busy = out / f".step_4.pt.{live.pid}.tmp"
        busy.write_bytes(b"x" * 4096)
        unrelated = out / "notes.tmp"
        unrelated.write_text("mine")
        RunFolder(out, main=True).close()
        assert not orphan.exists() and busy.exists() and unrelated.exists()
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------ a resume takes the changed settings
def _tiny(*extra: str):
    return load_config(DIGITS, [*TINY, "train.iterations=6", "train.eval_interval=100", "train.log_interval=1",
                                "method.name=supervised", *extra])


def _poly(lr: float, step: int, iterations: int, power: float) -> float:
    return lr * max(0.0, 1.0 - step / iterations) ** power


def test_a_resume_with_a_lower_lr_trains_with_it_from_the_resumed_step(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    first = Trainer(_tiny("optim.lr=0.01"), out, show_progress=False)
    first.run(until=3)
    resumed = Trainer(_tiny("optim.lr=0.0001", "optim.momentum=0.5"), out, resume=True, show_progress=False)
    assert "optim.lr 0.01 -> 0.0001" in capsys.readouterr().err
    group = resumed.optimizer.param_groups[0]
    power = resumed.cfg.optim.poly_power
    assert group["lr"] == pytest.approx(_poly(1e-4, 3, 6, power), rel=1e-12) and group["momentum"] == 0.5
    resumed.run(evaluate=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["iteration"]: r["lr"] for r in records if r["kind"] == "train"}
    for step in (4, 5, 6):  # the lr a step trains with is the schedule at the step before it
        assert lrs[step] == pytest.approx(_poly(1e-4, step - 1, 6, power), rel=1e-9)
    assert lrs[3] == pytest.approx(_poly(1e-2, 2, 6, power), rel=1e-9)


def test_a_resume_with_the_same_settings_continues_bit_for_bit(tmp_path) -> None:
    whole = Trainer(_tiny(), tmp_path / "whole", show_progress=False)
    whole.run(evaluate=False)
    part = Trainer(_tiny(), tmp_path / "part", show_progress=False)
    part.run(until=3, evaluate=False)
    resumed = Trainer(_tiny(), tmp_path / "part", resume=True, show_progress=False)
    resumed.run(evaluate=False)
    a, b = whole.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_with_another_optimizer_is_refused_by_name(tmp_path) -> None:
    out = tmp_path / "run"
    Trainer(_tiny(), out, show_progress=False).run(until=2, evaluate=False)
    with pytest.raises(ValueError, match=r"optim.name='sgd', the config asks for 'adamw'"):
        Trainer(_tiny("optim.name=adamw"), out, resume=True, show_progress=False)


# ------------------------------------------------------------------ --resume auto skips a damaged newest file
@pytest.mark.parametrize("damage", ["truncate", "empty", "garble"])
def test_resume_auto_continues_from_the_newest_whole_checkpoint_naming_the_skipped_one(tmp_path, capsys,
                                                                                        damage) -> None:
    out = tmp_path / "run"
    Trainer(_tiny("train.checkpoint_interval=2", "train.keep_last=3"), out, show_progress=False).run(
        until=4, evaluate=False)
    newest = out / "step_4.pt"
    data = newest.read_bytes()
    newest.write_bytes({"truncate": data[: len(data) // 2], "empty": b"",
                        "garble": data[:2000] + bytes(1000) + data[3000:]}[damage])
    capsys.readouterr()
    resumed = Trainer(_tiny("train.checkpoint_interval=2", "train.keep_last=3"), out, resume="auto",
                      show_progress=False)
    err = capsys.readouterr().err
    assert resumed.state.iteration == 2
    assert f"skipping {newest}" in err and f"resumed from {out / 'step_2.pt'}" in err
    assert resumed.run(evaluate=False)["iteration"] == 6
    assert load_checkpoint(out / "step_4.pt")["iteration"] == 4  # rewritten whole by the continued run


# ------------------------------------------------------------------ a second SIGTERM during a checkpoint write
def test_a_second_sigterm_while_a_checkpoint_is_written_exits_143_naming_the_newest_whole_one(
        tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "run"
    real_save = torch.save
    writes = []

    def signalled_save(obj, handle, *args, **kwargs):
        writes.append(obj.get("iteration"))
        if len(writes) == 2:  # the second checkpoint: two SIGTERMs arrive while it is being written
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", signalled_save)
    code = main(["train", "digits/default", "--out", str(out), *TINY, "train.iterations=6",
                 "train.checkpoint_interval=2", "train.eval_interval=100"])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM, err
    assert f"the newest whole checkpoint is {out / 'step_2.pt'}" in err and "cannot write" not in err
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".pt", ".tmp")) == ["step_2.pt"]
    assert load_checkpoint(out / "step_2.pt")["iteration"] == 2
