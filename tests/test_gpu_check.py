"""benchmarks/gpu_check.sh in its CPU smoke mode (every stage at toy sizes), and the pieces of
benchmarks/bench_memory.py that turn measurements into figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_memory import fit_lines, resident_bytes  # noqa: E402

STAGES = ["cuda_tests", "train_steps", "method_steps", "bench_step_scl", "bench_step_cl", "bench_step_scl_1gpu",
          "bench_data", "bench_losses", "bench_memory", "inference"]


def test_fit_recovers_a_known_line_and_predicts_800x800():
    # forward+backward peak = 3 GiB + 20 KiB per pixel at 64x64 and 128x128; the update phase peaks
    # at 3.5 GiB at 64x64 (above the line there) and below the line at 128x128
    a, b = 3 * 1024**3, 20 * 1024
    runs = [{"activation_checkpointing": "all", "amp": "bf16", "crop": [h, h], "peak_fwd_bwd_bytes": a + b * h * h,
             "peak_bytes": max(a + b * h * h, int(3.5 * 1024**3))} for h in (64, 128)]
    runs.append({"activation_checkpointing": "off", "amp": "off", "crop": [64, 64], "peak_bytes": 1,
                 "peak_fwd_bwd_bytes": 1})
    (fit,) = fit_lines(runs, (800, 800))  # the single-size setting gets no line
    assert fit["activation_checkpointing"] == "all" and fit["amp"] == "bf16"
    assert fit["bytes_per_pixel"] == pytest.approx(b) and fit["intercept_bytes"] == pytest.approx(a)
    assert fit["predicted_peak_bytes"] == pytest.approx(a + b * 640_000)  # 15.2 GiB: the line wins
    assert fit["max_relative_residual"] == pytest.approx(0.0, abs=1e-12)
    (small,) = fit_lines(runs, (64, 64))
    assert small["predicted_peak_bytes"] == int(3.5 * 1024**3)  # at a small crop the update phase wins


def test_resident_bytes_counts_each_storage_once():
    w = torch.zeros(1000)  # 4000 bytes
    g = torch.zeros(10, dtype=torch.float64)  # 80 bytes
    assert resident_bytes([w, w[:10], w.view(10, 100), g]) == 4080


def test_the_gpu_stages_end_within_ten_minutes(tmp_path):
    from gpu_check import plan

    stages = plan(tmp_path, smoke=False)
    assert [s.name for s in stages] == STAGES
    assert sum(s.timeout_s for s in stages) <= 590  # room for the start and the summary


def test_usage_errors_exit_2(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    env = dict(os.environ, PYTHON=sys.executable)  # this interpreter, wherever the package is installed
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert usage.returncode == 2 and "usage" in usage.stderr
    if not torch.cuda.is_available():
        no_gpu = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True, env=env)
        assert no_gpu.returncode == 2 and "--cpu-smoke" in no_gpu.stderr


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_and_writes_the_summary(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--cpu-smoke"],
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHON=sys.executable))
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == STAGES
    not_ok = {name: s["tail"] for name, s in stages.items() if s["status"] != "ok"}
    assert not not_ok and proc.returncode == 0 and summary["passed"] and summary["smoke"]

    steps = stages["train_steps"]["result"]["runs"]
    assert [(r["model"], r["amp"]) for r in steps] == [("compact", "off"), ("compact", "bf16"), ("compact", "fp16")]
    assert all(r["losses_finite"] and len(r["losses"]) == 2 for r in steps)
    methods = stages["method_steps"]["result"]["runs"]
    assert [r["method"] for r in methods] == ["fixmatch", "fixmatch_scl", "unimatch_v1", "unimatch_v1_scl",
                                              "unimatch_v2", "unimatch_v2_scl"]
    assert all(r["losses_finite"] and r["weights_changed"] and r["crop"] == [32, 32] for r in methods)
    # UniMatch V1 fills its boxes from a second unlabeled batch: twice the others' unlabeled crops
    assert [r["batch"] for r in methods] == [[4, 4]] * 2 + [[4, 8]] * 2 + [[4, 4]] * 2
    memory = stages["bench_memory"]["result"]["runs"]
    assert {(r["activation_checkpointing"], r["amp"]) for r in memory} == {
        (c, a) for c in ("off", "encoder", "all") for a in ("off", "bf16")}
    assert all(r["peak_bytes"] > 0 and r["step_s"] > 0 for r in memory)
    step = stages["bench_step_scl"]["result"]
    assert step["overhead_ratio"] > 0 and step["train_step_ms"]["median"] > 0
    one_gpu = stages["bench_step_scl_1gpu"]["result"]
    assert one_gpu["config"]["resolved"]["train"]["grad_accum"] == 2  # the recipe's accumulation, at toy size
    # the data stage compares its loaders with what that iteration consumes: 2 micro-batches of 4 + 4 crops
    data = stages["bench_data"]["result"]["comparison"]
    assert data["step_ms"] == one_gpu["loop_step_ms"] and data["images_per_step"] == {"labeled": 8, "unlabeled": 8}
    for stream in ("labeled", "unlabeled"):
        assert data["streams"][stream]["consumed_images_per_s"] == pytest.approx(8 / (one_gpu["loop_step_ms"] / 1e3))

    text = (out / "summary.md").read_text()
    assert all(f"| {name} | ok |" in text for name in STAGES) and "All stages passed." in text


def test_calibrated_batchnorm_holds_the_batch_statistics_in_student_and_teacher(tmp_path):
    from sclseg.config import load_config, resolve_config_path
    from sclseg.engine.trainer import Trainer

    from bench_memory import synthetic_batches
    from bench_step import synthetic_data
    from gpu_check import calibrate_batchnorm

    cfg = load_config(resolve_config_path("digits/default"), ["data.crop_size=[32, 32]", "model.pretrained=null",
                                                               "data.batch_size=2", "data.unlabeled_batch_size=2"])
    trainer = Trainer(cfg, tmp_path, data=synthetic_data(cfg, 5), show_progress=False)
    batch, ubatch = synthetic_batches(trainer, 0)
    student = trainer.student
    first_bn = next(m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    hook = first_bn.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach().clone()))
    calibrate_batchnorm(trainer, batch, ubatch)
    hook.remove()
    (features,) = seen  # one pass, over the labeled and the unlabeled images together
    assert features.shape[0] == 4
    torch.testing.assert_close(first_bn.running_mean, features.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first_bn.running_var, features.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    assert first_bn.momentum == 0.1  # the layers' own momentum is back
    teacher = trainer.mean_teacher.teacher.state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in student.state_dict().items())
