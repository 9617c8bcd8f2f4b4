"""Checkpoints and resume: bit-exact continuation, signals, keep-last/best, weights_only, export.

The exact-resume tests compare, with ``torch.equal``, every tensor of the final checkpoints of
an uninterrupted run and of a run stopped and resumed: student, teacher, optimizer state, lr
schedule, GradScaler, the CutMix/SCL generator of every rank and all global RNG states. The
``scl`` method covers CutMix boxes and SCL pair sampling (``max_pairs`` small enough that pairs
are always sampled); the data streams cover order and per-sample augmentation; a model with
dropout covers the global torch RNG.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import sclseg.engine.trainer as trainer_module
from sclseg.cli import main
from sclseg.config import load_config, resolve_config_path
from sclseg.data import build_data
from sclseg.data.stream import make_stream
from sclseg.data.transforms import PhotometricAugment
from sclseg.engine.checkpoint import load_checkpoint, save_atomic
from sclseg.engine.trainer import Trainer

from tiny_config import TINY

# scl with few boxes and few pairs: SCL regions always exceed max_pairs, so pairs are sampled
SCL = [*TINY, "method.name=scl", "method.n_boxes=4", "method.last_boxes=2", "method.max_pairs=64",
       "train.iterations=6", "train.log_interval=1", "train.checkpoint_interval=3", "train.eval_interval=3"]


def _cfg(*overrides: str):
    return load_config(resolve_config_path("digits/default"), list(overrides))


@pytest.fixture(scope="module")
def data():
    return build_data(_cfg(*TINY))


def assert_same_state(a, b, path: str = "checkpoint") -> None:
    """``torch.equal`` on every tensor, ``==`` on everything else, recursively."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _final_state(out: Path, step: int) -> dict:
    ckpt = load_checkpoint(out / f"step_{step}.pt")
    del ckpt["config"]  # may legitimately differ (e.g. data.num_workers)
    return ckpt


class _WithDropout(nn.Module):
    """The compact model behind channel dropout: its masks come from the global torch RNG."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.drop = nn.Dropout2d(0.3)
        self.inner = inner

    def forward(self, x):
        return self.inner(self.drop(x))


@pytest.fixture
def dropout_model(monkeypatch):
    original = trainer_module.create_model
    monkeypatch.setattr(trainer_module, "create_model", lambda *a, **k: _WithDropout(original(*a, **k)))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 6-step scl run (with dropout), the reference of the resume tests."""
    out = tmp_path_factory.mktemp("reference")
    mp = pytest.MonkeyPatch()
    original = trainer_module.create_model
    mp.setattr(trainer_module, "create_model", lambda *a, **k: _WithDropout(original(*a, **k)))
    try:
        Trainer(_cfg(*SCL), out, data=data, show_progress=False).run()
    finally:
        mp.undo()
    return out


def test_stopped_and_resumed_run_equals_the_uninterrupted_run_bit_for_bit(reference, data, dropout_model, tmp_path):
    out = tmp_path / "stopped"
    stopped = Trainer(_cfg(*SCL), out, data=data, show_progress=False).run(until=2)
    assert stopped["stopped"] and stopped["iteration"] == 2 and (out / "step_2.pt").is_file()
    assert not (out / "final.json").exists()
    # the rest with a data worker: the batches must not depend on who loads them
    Trainer(_cfg(*SCL, "data.num_workers=1"), out, data=data, show_progress=False, resume=True).run()
    assert_same_state(_final_state(reference, 6), _final_state(out, 6))
    # the metrics of the resumed run continue the stopped run's, without gaps or repeats
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    ref_records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    losses = lambda rs: [r["loss"] for r in rs if r["kind"] == "train"]  # noqa: E731
    assert losses(records) == losses(ref_records)


def test_resuming_a_saved_checkpoint_of_the_run_continues_it_exactly(reference, data, dropout_model, tmp_path):
    out = tmp_path / "from_step3"
    Trainer(_cfg(*SCL), out, data=data, show_progress=False, resume=reference / "step_3.pt").run()
    assert_same_state(_final_state(reference, 6), _final_state(out, 6))


@pytest.mark.parametrize("scramble", ["global_rng", "cutmix_generator", "data_stream"])
def test_the_comparison_detects_a_lost_random_state(reference, data, dropout_model, tmp_path, scramble):
    """Negative controls: dropping any one piece of the saved state breaks the equality."""
    out = tmp_path / scramble
    trainer = Trainer(_cfg(*SCL), out, data=data, show_progress=False, resume=reference / "step_3.pt")
    if scramble == "global_rng":
        torch.manual_seed(12345)
    elif scramble == "cutmix_generator":
        trainer.method.generator.manual_seed(12345)
    else:
        trainer.state.stream_offsets = {role: -trainer.state.iteration for role in ("labeled", "unlabeled")}
    trainer.run()
    with pytest.raises(AssertionError):
        assert_same_state(_final_state(reference, 6), _final_state(out, 6))


def test_every_method_reaches_the_end_of_the_warm_up_in_the_same_state(data, dropout_model, tmp_path, monkeypatch):
    """A supervised run stopped at ``unlabeled_start`` and resumed as scl equals an scl run, bit for bit.

    The scl run from scratch skips its unlabeled batches during the warm-up without loading
    them: its unlabeled stream opens once, at batch ``unlabeled_start``.
    """
    warm = [*SCL, "method.unlabeled_start=3"]
    opened = []
    make = trainer_module.make_stream
    monkeypatch.setattr(trainer_module, "make_stream",
                        lambda *a, **k: opened.append((k["name"], k["start_batch"])) or make(*a, **k))
    Trainer(_cfg(*warm), tmp_path / "scl", data=data, show_progress=False).run()
    assert opened == [("labeled", 0), ("unlabeled", 3)]

    sup = Trainer(_cfg(*warm, "method.name=supervised"), tmp_path / "sup", data=data, show_progress=False)
    sup.run(until=3)
    Trainer(_cfg(*warm), tmp_path / "resumed", data=data, show_progress=False,
            resume=tmp_path / "sup" / "step_3.pt").run()
    assert_same_state(_final_state(tmp_path / "scl", 6), _final_state(tmp_path / "resumed", 6))


def test_streams_give_the_same_batches_with_and_without_workers_and_after_resuming(data) -> None:
    photometric = PhotometricAugment(0.3, 0.5, 5)

    def batches(num_workers: int, start: int, count: int, batch_size: int = 4, **kw):
        stream = make_stream(data.unlabeled, batch_size, seed=5, start_batch=start, num_workers=num_workers,
                             photometric=photometric, **kw)
        try:
            return [next(stream) for _ in range(count)]
        finally:
            stream.close()

    plain = batches(0, 0, 12)  # 32 unlabeled images: 8 batches per epoch, so this crosses an epoch
    for start, other in ((0, batches(1, 0, 12)), (3, batches(0, 3, 9)), (9, batches(1, 9, 3))):
        for i, y in enumerate(other):
            x = plain[start + i]
            assert x["name"] == y["name"], (start, i)
            assert torch.equal(x["image"], y["image"]), (start, i)
            assert torch.equal(x["photometric"], y["photometric"]), (start, i)
    assert len({tuple(row.tolist()) for b in plain for row in b["photometric"]}) == 12 * 4  # each sample its own
    # two ranks with batch 2 see exactly the images and augmentations of one process with batch 4
    ranks = [batches(0, 0, 3, 2, rank=r, world_size=2) for r in (0, 1)]
    one = batches(0, 0, 3)
    for k in range(3):
        merged = {n: (img, row) for r in (0, 1)
                  for n, img, row in zip(ranks[r][k]["name"], ranks[r][k]["image"], ranks[r][k]["photometric"])}
        assert sorted(merged) == sorted(one[k]["name"])
        for name, image, row in zip(one[k]["name"], one[k]["image"], one[k]["photometric"]):
            assert torch.equal(merged[name][0], image) and torch.equal(merged[name][1], row)


def test_keeps_the_last_k_checkpoints_and_the_best(data, tmp_path) -> None:
    out = tmp_path / "run"
    Trainer(_cfg(*TINY, "train.iterations=5", "train.checkpoint_interval=1", "train.keep_last=2",
                 "train.eval_interval=1", "train.log_interval=5"), out, data=data, show_progress=False).run()
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "step_4.pt", "step_5.pt"]
    assert not list(out.glob(".*tmp"))  # no temporary files left behind
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    best = max(evals, key=lambda r: (r["miou"], -r["iteration"]))
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["iteration"] == best["iteration"] and ckpt["best"]["miou"] == best["miou"]


def test_a_fresh_cli_run_refuses_a_folder_with_checkpoints_and_resume_auto_continues(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = ["train", "digits/default", "--out", str(out), *TINY, "train.iterations=2", "train.eval_interval=2",
            "train.checkpoint_interval=1"]
    assert main(args) == 0
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume", "auto"]) == 0  # nothing left to do: step 2 of 2
    fresh = tmp_path / "fresh"
    assert main(["train", "digits/default", "--out", str(fresh), *TINY, "train.iterations=1", "--resume", "auto"]) == 0
    assert (fresh / "step_1.pt").is_file()


def test_checkpoints_load_with_weights_only_and_a_code_carrying_pickle_is_refused(tmp_path, capsys) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "sclseg-checkpoint-1", "payload": Evil()}, evil)
    with pytest.raises(ValueError, match=r"evil\.pt: refused to load.*unsafe"):
        load_checkpoint(evil)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "a.png")
    assert main(["predict", str(photos), "--checkpoint", str(evil), "--out", str(tmp_path / "p")]) == 2
    assert "evil.pt" in capsys.readouterr().err
    assert not marker.exists()
    truncated = tmp_path / "truncated.pt"
    save_atomic({"format": "sclseg-checkpoint-1", "w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"truncated\.pt: not a readable PyTorch file"):
        load_checkpoint(truncated)


def test_exported_weights_predict_like_the_checkpoint(reference, tmp_path, capsys) -> None:
    # the reference run's model has dropout (a test-only wrapper): export a plain run instead
    run = tmp_path / "run"
    assert main(["train", "digits/default", "--out", str(run), *TINY,
                 "train.iterations=2", "train.eval_interval=2"]) == 0
    exported = tmp_path / "model.pt"
    assert main(["export", str(run / "step_2.pt"), str(exported)]) == 0
    weights = torch.load(exported, weights_only=True)
    assert weights["format"] == "sclseg-weights-1" and weights["weights"] == "teacher"
    assert not {"optimizer", "rng", "generators", "student", "teacher"} & weights.keys()
    ckpt = load_checkpoint(run / "step_2.pt")
    assert_same_state(weights["model"], ckpt["teacher"])
    with pytest.raises(ValueError, match="cannot be resumed"):
        load_checkpoint(exported, kind="checkpoint")

    images = tmp_path / "images"
    images.mkdir()
    val = build_data(_cfg(*TINY)).eval_splits["val"]
    from PIL import Image

    for i in range(2):
        rgb = (val[i]["image"].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(rgb).save(images / f"{i}.png")
    for source, name in ((run / "step_2.pt", "from_ckpt"), (exported, "from_export")):
        assert main(["predict", str(images), "--checkpoint", str(source), "--out", str(tmp_path / name)]) == 0
    for i in range(2):
        a = Image.open(tmp_path / "from_ckpt" / f"{i}_labels.png")
        b = Image.open(tmp_path / "from_export" / f"{i}_labels.png")
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert main(["evaluate", "digits/default", "--checkpoint", str(exported), "--out", str(tmp_path / "e.json"),
                 *TINY]) == 0
    student = tmp_path / "student.pt"
    assert main(["export", str(run / "step_2.pt"), str(student), "--student", "--half"]) == 0
    half = torch.load(student, weights_only=True)
    assert half["weights"] == "student"
    assert all(v.dtype == torch.float16 for v in half["model"].values() if v.is_floating_point())
    assert main(["predict", str(images), "--checkpoint", str(exported), "--student", "--out", str(tmp_path / "x")]) == 2
    assert "teacher weights only" in capsys.readouterr().err


# ------------------------------------------------------------------ signals on a real process
def _start(out: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    log = out.parent / f"{out.name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "sclseg", "train", "digits/default", "--out", str(out), *TINY,
           "train.log_interval=1", "train.eval_interval=1000", "train.checkpoint_interval=1000", *extra]
    handle = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=out.parent)
    handle.close()
    return proc, log


def _wait_for_first_step(proc: subprocess.Popen, out: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().strip():
            return
        assert proc.poll() is None, "training ended before the signal could be sent"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no metrics line within the timeout")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tmp_path, signum) -> None:
    out = tmp_path / "run"
    total = 30  # ~0.1 s a step: the signal lands after step 1 or 2, long before the end
    proc, log = _start(out, f"train.iterations={total}")
    _wait_for_first_step(proc, out)
    proc.send_signal(signum)
    code = proc.wait(timeout=60)
    text = log.read_text()
    assert code == 128 + signum, text
    assert f"{signal.Signals(signum).name} received: stopped after step" in text
    assert "Resume with: sclseg train" in text and "--resume" in text
    step = int(text.split("stopped after step ")[1].split()[0])
    assert 1 <= step < total
    ckpt = load_checkpoint(out / f"step_{step}.pt")
    assert ckpt["iteration"] == step
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["iteration"] == step
    if signum == signal.SIGTERM:  # the printed command resumes and runs to the end
        cmd = text.split("Resume with: ")[1].split("\n")[0].split()
        assert cmd[:2] == ["sclseg", "train"]
        assert main(cmd[1:]) == 0
        final = json.loads((out / "final.json").read_text())
        assert final["iteration"] == total and (out / f"step_{total}.pt").is_file()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in records if r["kind"] == "train"] == list(range(1, total + 1))
