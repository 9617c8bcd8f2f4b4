"""Scale-out on CPU: torchrun DDP with Gloo and synchronized BatchNorm, sharded evaluation,
mixed precision, gradient accumulation, channels_last and torch.compile.

What the DDP test compares. Two processes with per-rank batch b and one process with batch 2b
see the same images with the same augmentations (the streams split each epoch's permutation
by global position, and augmentation seeds follow the global position), so with synchronized
BatchNorm and DDP's gradient averaging both runs compute the same updates up to float
rounding. The run uses the supervised method: the semi-supervised methods pair each rank's
unlabeled images among themselves and draw CutMix boxes from per-rank generators, which by
design cannot line up with one process's. The compact model's ASPP dropout (p=0.1) is set to
0 for the same reason: dropout masks come from per-rank RNG streams (its exact resume is
tested in test_resume.py). Random scales are >= 1, so no crop is padded with ignore pixels
and every rank's loss averages the same number of pixels (DDP averages per-rank means).
"""

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
from torch import nn

import sclseg.engine.trainer as trainer_module
from sclseg.cli import main
from sclseg.config import load_config, resolve_config_path
from sclseg.data import build_data
from sclseg.engine.checkpoint import load_checkpoint
from sclseg.engine.trainer import Trainer
from sclseg.methods import build_method
from sclseg.teacher import MeanTeacher

from tiny_config import TINY

# lr 0.01: at the default 0.05 this tiny network is so ill-conditioned by step 3 that one process
# with 1 thread and with 2 threads already differ by 4e-4 in the gradients (float rounding, amplified)
DDP = [*TINY, "method.name=supervised", "data.scale_range=[1.0,1.25]", "optim.lr=0.01", "train.iterations=4",
       "train.log_interval=1", "train.eval_interval=4", "train.checkpoint_interval=4", "eval.batch_size=1"]

# torchrun runs this file: the CLI with the model's dropout switched off (see the module docstring)
_LAUNCHER = '''
import sys
from torch import nn
import sclseg.engine.trainer as trainer_module
_create = trainer_module.create_model
def _without_dropout(*args, **kwargs):
    model = _create(*args, **kwargs)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model
trainer_module.create_model = _without_dropout
from sclseg.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _cfg(*overrides: str):
    return load_config(resolve_config_path("digits/default"), list(overrides))


def _torchrun(tmp_path: Path, *args: str, nproc: int = 2, timeout: float = 120.0) -> subprocess.CompletedProcess:
    launcher = tmp_path / "launch_sclseg.py"
    launcher.write_text(_LAUNCHER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(launcher), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The same 4 steps as 2 processes x batch 2 (torchrun, Gloo) and as 1 process x batch 4."""
    root = tmp_path_factory.mktemp("ddp")
    result = _torchrun(root, "train", "digits/default", "--out", str(root / "two"), *DDP, "data.batch_size=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    mp = pytest.MonkeyPatch()
    create = trainer_module.create_model

    def without_dropout(*args, **kwargs):
        model = create(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        return model

    mp.setattr(trainer_module, "create_model", without_dropout)
    try:
        assert main(["train", "digits/default", "--out", str(root / "one"), *DDP, "data.batch_size=4"]) == 0
    finally:
        mp.undo()
    return root, result


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_double_batch(ddp_runs) -> None:
    root, _ = ddp_runs
    two, one = load_checkpoint(root / "two" / "step_4.pt"), load_checkpoint(root / "one" / "step_4.pt")
    assert two["world_size"] == 2 and len(two["generators"]) == 2 and len(two["rng"]) == 2
    assert two["streams"]["labeled"] == one["streams"]["labeled"] == 4  # two epochs of the 8 labeled
    for role in ("student", "teacher"):
        assert two[role].keys() == one[role].keys()
        for name, tensor in one[role].items():  # weights and BatchNorm running statistics
            torch.testing.assert_close(two[role][name], tensor, rtol=1e-4, atol=2e-5, msg=f"{role}.{name}")
    momentum = one["optimizer"]["state"]
    for index, state in momentum.items():
        torch.testing.assert_close(two["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"],
                                   rtol=1e-4, atol=2e-5, msg=f"momentum {index}")


def test_only_rank_zero_writes_files_and_logs(ddp_runs) -> None:
    root, result = ddp_runs
    run = root / "two"
    assert sorted(p.name for p in run.iterdir() if p.name not in ("tb", ".sclseg.lock")) == [
        "best.pt", "config.yaml", "final.json", "metrics.jsonl", "step_4.pt"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["iteration"]) for r in records] == [
        ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert result.stdout.count('"out":') == 1  # the final JSON, printed once
    assert json.loads((run / "final.json").read_text())["world_size"] == 2


def test_sharded_evaluation_gathers_one_confusion_matrix(ddp_runs, tmp_path) -> None:
    """Both ranks scored 3 of the 6 val images; the all-reduced result equals one process's."""
    root, _ = ddp_runs
    last = json.loads((root / "two" / "final.json").read_text())["last_eval"]  # scored by the 2 processes
    for flag, role in (([], "teacher"), (["--student"], "student")):
        out = tmp_path / f"{role}.json"
        assert main(["evaluate", "digits/default", "--checkpoint", str(root / "two" / "step_4.pt"), "--out", str(out),
                     *flag, *DDP]) == 0
        one = json.loads(out.read_text())  # scored by this process alone
        assert one["images"] == 6
        assert one["miou"] == last[f"{role}_miou"]
        assert one["per_class_iou"] == last[f"{role}_per_class_iou"]


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step_and_the_run_resumes(tmp_path) -> None:
    out = tmp_path / "scl"
    total = 12  # ~0.25 s a step under Gloo: the signal lands after step 1 or 2
    args = ["train", "digits/default", "--out", str(out), *TINY, "data.batch_size=2", "data.unlabeled_batch_size=2",
            f"train.iterations={total}", "train.log_interval=1", "train.eval_interval=1000",
            "train.checkpoint_interval=1000"]
    launcher = tmp_path / "launch_sclseg.py"
    launcher.write_text(_LAUNCHER)
    log = tmp_path / "torchrun.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                 str(launcher), *args], stdout=handle, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 90
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to every worker
    assert proc.wait(timeout=90) != 0
    text = log.read_text()
    assert text.count("SIGTERM received: stopped after step") == 1, text[-3000:]  # rank 0 speaks
    step = int(text.split("stopped after step ")[1].split()[0])
    assert 1 <= step < total
    ckpt = load_checkpoint(out / f"step_{step}.pt")
    assert ckpt["iteration"] == step and len(ckpt["generators"]) == 2
    assert ckpt["generators"][0].tolist() != ckpt["generators"][1].tolist()  # per-rank CutMix streams
    assert "torchrun" in text.split("Resume with: ")[1].split("\n")[0]
    result = _torchrun(tmp_path, *args, "--resume")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == list(range(1, total + 1))
    assert json.loads((out / "final.json").read_text())["iteration"] == total


# ------------------------------------------------------------------ mixed precision and memory
@pytest.fixture(scope="module")
def data():
    return build_data(_cfg(*TINY))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_runs_on_cpu_with_float32_losses(data, tmp_path, amp) -> None:
    out = tmp_path / amp
    trainer = Trainer(_cfg(*TINY, "method.name=scl", f"train.amp={amp}", "train.iterations=3", "train.log_interval=1",
                           "train.eval_interval=3", "train.checkpoint_interval=3"), out, data=data, show_progress=False)
    seen = []
    original = trainer.method.step

    def spy(*args, **kwargs):
        terms = original(*args, **kwargs)
        seen.append({k: v.dtype for k, v in terms.items()})
        return terms

    trainer.method.step = spy
    trainer.run()
    assert all(dtype == torch.float32 for step in seen for dtype in step.values())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if r["kind"] == "train")
    ckpt = load_checkpoint(out / "step_3.pt")
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
    assert all(v.dtype == torch.float32 for v in ckpt["student"].values() if v.is_floating_point())


def test_gradient_accumulation_equals_the_double_batch() -> None:
    """Without BatchNorm (whose statistics are per micro-batch), k micro-batches of b are one batch of k*b."""
    cfg = _cfg(*TINY, "method.name=supervised", "method.relax_window=1")
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (4, 8, 8), generator=generator)

    def run(batches):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
        teacher = MeanTeacher(model, 0.9)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
        method = build_method(cfg, model, teacher, optimizer, scheduler, generator=torch.Generator())
        for _ in range(2):
            terms = method.step(batches, None, 0.0)
        return model, terms

    whole, terms_whole = run([{"image": images, "mask": labels}])
    micro, terms_micro = run([{"image": images[:2], "mask": labels[:2]}, {"image": images[2:], "mask": labels[2:]}])
    for p, q in zip(whole.parameters(), micro.parameters()):
        torch.testing.assert_close(p, q)
    torch.testing.assert_close(terms_whole["loss"], terms_micro["loss"])


def test_accumulation_bf16_and_channels_last_resume_bit_for_bit(data, tmp_path) -> None:
    options = [*TINY, "method.name=scl", "method.n_boxes=4", "method.last_boxes=2", "method.max_pairs=64",
               "train.grad_accum=2", "train.amp=bf16", "train.channels_last=true", "train.iterations=4",
               "train.log_interval=1", "train.eval_interval=100", "train.checkpoint_interval=2"]
    whole = Trainer(_cfg(*options), tmp_path / "whole", data=data, show_progress=False)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in whole.student.parameters() if p.dim() == 4)
    whole.run()
    Trainer(_cfg(*options), tmp_path / "parts", data=data, show_progress=False).run(until=1)
    Trainer(_cfg(*options), tmp_path / "parts", data=data, show_progress=False, resume=True).run()
    a, b = load_checkpoint(tmp_path / "whole" / "step_4.pt"), load_checkpoint(tmp_path / "parts" / "step_4.pt")
    assert a["streams"] == {"labeled": 8, "unlabeled": 8}  # two micro-batches per step
    for key in ("student", "teacher", "optimizer", "generators", "rng"):
        _assert_equal(a[key], b[key], key)


def _assert_equal(a, b, path: str) -> None:
    if torch.is_tensor(a):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_compile_is_off_by_default(data, tmp_path) -> None:
    trainer = Trainer(_cfg(*TINY, "train.iterations=1"), tmp_path / "run", data=data, show_progress=False)
    assert not trainer.cfg.train.compile and not hasattr(trainer.student, "_orig_mod")


@pytest.mark.skipif(os.environ.get("SCLSEG_TEST_COMPILE") != "1",
                    reason="torch.compile takes over a minute on CPU; set SCLSEG_TEST_COMPILE=1 to run it")
def test_compiled_student_trains_and_saves_plain_weights(data, tmp_path) -> None:
    trainer = Trainer(_cfg(*TINY, "method.name=supervised", "train.compile=true", "train.iterations=2",
                           "train.eval_interval=2"), tmp_path / "run", data=data, show_progress=False)
    assert hasattr(trainer.student, "_orig_mod")
    trainer.run()
    ckpt = load_checkpoint(tmp_path / "run" / "step_2.pt")
    assert not any(k.startswith("_orig_mod") for k in ckpt["student"])


# ------------------------------------------------------------------ two machines
def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_nodes(tmp_path: Path, args: list[str], tag: str) -> list[tuple[subprocess.Popen, Path]]:
    """Two torchrun agents, one CPU process each, meeting at a c10d rendezvous on 127.0.0.1: the
    multi-node command of docs/distributed.md with --nnodes 2."""
    launcher = tmp_path / "launch_sclseg.py"
    launcher.write_text(_LAUNCHER)
    port, nodes = _free_port(), []
    for node in range(2):
        log = tmp_path / f"{tag}_node{node}.log"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"sclseg-{tag}",
               "--max-restarts", "0", str(launcher), *args]
        with open(log, "w") as handle:
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=tmp_path,
                                    env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
        nodes.append((proc, log))
    return nodes


@pytest.mark.slow
def test_two_nodes_stop_together_on_a_sigterm_to_one_agent_and_resume_auto_finishes(tmp_path) -> None:
    """A SIGTERM to one node's agent (a scheduler pre-empting one machine) stops both nodes after the
    same step with one checkpoint; both agents started again with ``--resume auto`` finish the run."""
    out, total = tmp_path / "two_nodes", 16
    args = ["train", "digits/default", "--out", str(out), "--resume", "auto", *TINY, "data.batch_size=2",
            "data.unlabeled_batch_size=2", f"train.iterations={total}", "train.log_interval=1",
            "train.eval_interval=1000", "train.checkpoint_interval=1000"]
    nodes = _two_nodes(tmp_path, args, "first")
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert all(p.poll() is None for p, _ in nodes) and time.monotonic() < deadline, nodes[0][1].read_text()[-3000:]
        time.sleep(0.05)
    nodes[1][0].send_signal(signal.SIGTERM)  # one machine's agent only
    codes = [proc.wait(timeout=120) for proc, _ in nodes]
    text = nodes[0][1].read_text()
    assert all(code != 0 for code in codes), text[-3000:]
    assert text.count("SIGTERM received: stopped after step") == 1, text[-3000:]  # rank 0 speaks for both
    step = int(text.split("stopped after step ")[1].split()[0])
    assert 1 <= step < total and load_checkpoint(out / f"step_{step}.pt")["world_size"] == 2
    nodes = _two_nodes(tmp_path, args, "again")
    codes = [proc.wait(timeout=180) for proc, _ in nodes]
    assert codes == [0, 0], nodes[0][1].read_text()[-3000:] + nodes[1][1].read_text()[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r["kind"] == "train"] == list(range(1, total + 1))
    assert json.loads((out / "final.json").read_text())["iteration"] == total


@pytest.mark.slow
@pytest.mark.parametrize("method", ["unimatch_v1_scl", "unimatch_v2_scl"])
def test_the_weak_to_strong_methods_train_under_torchrun(tmp_path, method) -> None:
    """Several student passes per step (eval mode, feature perturbation, two strong views) under DDP:
    both ranks finish with one set of weights."""
    out = tmp_path / method
    result = _torchrun(tmp_path, "train", "digits/default", "--out", str(out), *TINY, "data.batch_size=2",
                       "data.unlabeled_batch_size=4", f"method.name={method}", "train.iterations=2",
                       "train.log_interval=1", "train.eval_interval=2", "train.checkpoint_interval=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    final = json.loads((out / "final.json").read_text())
    assert final["world_size"] == 2 and final["iteration"] == 2 and final["method"] == method
    assert "loss_sc" in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
