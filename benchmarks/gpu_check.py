"""Validate a GPU machine in about ten minutes: one JSON + one markdown summary under OUT_DIR.

Stages (each a subprocess with its own time limit; a failed stage is recorded and the rest run):

1. ``cuda_tests``: the tests that need CUDA (``pytest -k cuda``; they skip without a GPU).
2. ``train_steps``: a few steps of the method (:meth:`sclseg.methods.Method.step`) of every paper-scale model
   (``sclseg.models.MODEL_NAMES`` without ``compact``) in float32, bfloat16 and float16 with a
   GradScaler, on synthetic Cityscapes-size crops (800x800, 1 labeled + 2 unlabeled): losses
   finite, weights changed, step time and peak memory (``python gpu_check.py steps``). The
   BatchNorm statistics are first set from one batch (:func:`calibrate_batchnorm`).
3. ``method_steps``: a few steps of each weak-to-strong method and its ``_scl`` twin on the recipe it is
   released with (``fixmatch`` and ``unimatch_v1`` on ``cityscapes/fixmatch_resnet101_deepstem_1-8``,
   801x801, UniMatch V1 with its second unlabeled batch; ``unimatch_v2`` on
   ``cityscapes/unimatch_v2_dinov2_base_1-8``, DINOv2-B at 798x798, 2 + 2), synthetic crops: step time
   and peak memory (``python gpu_check.py methods``).
4. ``bench_step_scl`` / ``bench_step_cl``: ``bench_step.py`` at paper scale (WRN38, 800x800,
   synthetic), ``overhead_ratio`` for each method; ``bench_step_scl_1gpu``: the one-GPU recipe
   (``cityscapes/scl_wrn38_1gpu``: 8 accumulated micro-batches, checkpointing, bf16), whose loop
   step is the time of one of its iterations.
5. ``bench_data``: the one-GPU recipe's data streams on synthetic Cityscapes-size PNGs with 0, 4
   and 8 workers, the colour jitter and blur timed on the GPU, against the images per second that
   ``bench_step_scl_1gpu``'s iteration consumes: do the loaders keep the GPU fed on this machine.
   It needs the ``cityscapes`` extra (the official label table).
6. ``bench_losses``: the losses at 512x1024.
7. ``bench_memory``: WRN38 at 800x800 for each checkpointing and AMP setting.
8. ``inference``: whole, tiled and multi-scale+flip tiled inference of WRN38 on 1024x2048 images.

``--cpu-smoke`` runs the same stages on the CPU at toy sizes (the ``compact`` model, 32-64 pixel
crops, one or two repeats) in well under a minute: it checks that the script, the benchmarks it
calls and the summary still work, not the figures.

Usage::

    bash benchmarks/gpu_check.sh runs/gpu_check            # on the GPU machine
    bash benchmarks/gpu_check.sh /tmp/smoke --cpu-smoke    # anywhere
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PRECISIONS = ("off", "bf16", "fp16")


@dataclass
class Stage:
    """One command of the check; ``json_name`` is the file under OUT_DIR it writes (if any)."""

    name: str
    argv: list[str]
    timeout_s: int
    json_name: Optional[str] = None
    env: dict[str, str] = field(default_factory=dict)


def plan(out: Path, smoke: bool) -> list[Stage]:
    """The stages and their sizes: paper scale on a GPU, toy sizes with ``smoke``.

    On a GPU the time limits add up to 590 s, so that the whole check ends within ten minutes.
    """
    py = sys.executable
    bench = str(HERE)
    device = "cpu" if smoke else "cuda"
    j = lambda name: str(out / name)  # noqa: E731
    if smoke:
        paper, crop, losses, infer = "digits/default", ["32", "32"], "32x64", ["--size", "64x128", "--tile", "32x64"]
        one_gpu, one_gpu_overrides = "digits/default", ["train.grad_accum=2"]
        data = ["--images", "4", "--size", "256x128", "--workers", "0,1", "--batches", "1", "data.crop_size=[64,64]"]
        steps = ["--models", "compact", "--crop", "32", "32", "--steps", "2"]
        methods = ["--config", "digits/default", "--crop", "32", "32", "--steps", "2"]
        iters = ["--iters", "2", "--warmup", "1"]
        inference_model = ["--model", "compact", "--scales", "0.5,1", "--ms-tile", "32x64", "--repeats", "1"]
    else:
        paper, crop, losses, infer = "cityscapes/scl_wrn38", ["800", "800"], "512x1024", ["--size", "1024x2048",
                                                                                          "--tile", "800x800"]
        one_gpu, one_gpu_overrides = "cityscapes/scl_wrn38_1gpu", []
        data = ["--images", "16", "--workers", "0,4,8", "--batches", "8"]
        steps = ["--crop", "800", "800", "--steps", "3"]
        methods = ["--steps", "3"]
        iters = ["--iters", "10", "--warmup", "3"]
        inference_model = ["--model", "deeplabv3plus_wrn38", "--scales", "0.5,1,2", "--ms-tile", "800x800",
                           "--repeats", "2"]
    stages = [
        Stage("cuda_tests", [py, "-m", "pytest", str(ROOT / "tests"), "-k", "cuda", "-q", "-rs", "-p",
                             "no:cacheprovider"], 70),
        Stage("train_steps", [py, str(HERE / "gpu_check.py"), "steps", "--device", device, "--out",
                              j("train_steps.json"), *steps], 115, "train_steps.json"),
        Stage("method_steps", [py, str(HERE / "gpu_check.py"), "methods", "--device", device, "--out",
                               j("method_steps.json"), *methods], 75, "method_steps.json"),
        *(Stage(f"bench_step_{m}", [py, f"{bench}/bench_step.py", "--config", paper, "--method", m, "--synthetic",
                                    "--device", device, *iters, "--out", j(f"bench_step_{m}.json")], 45,
                f"bench_step_{m}.json") for m in ("scl", "cl")),
        Stage("bench_step_scl_1gpu", [py, f"{bench}/bench_step.py", "--config", one_gpu, "--method", "scl",
                                      "--synthetic", "--device", device, "--iters", "2", "--warmup", "1",
                                      "--out", j("bench_step_scl_1gpu.json"), *one_gpu_overrides], 60,
              "bench_step_scl_1gpu.json"),
        Stage("bench_data", [py, f"{bench}/bench_data.py", "--config", "cityscapes/scl_wrn38_1gpu", "--device", device,
                             "--step-json", j("bench_step_scl_1gpu.json"), "--out", j("bench_data.json"), *data], 50,
              "bench_data.json"),
        Stage("bench_losses", [py, f"{bench}/bench_losses.py", "--device", device, "--sizes", losses, "--repeats",
                               "2" if smoke else "5", "--out", j("bench_losses.json")], 25, "bench_losses.json"),
        Stage("bench_memory", [py, f"{bench}/bench_memory.py", "--config", paper, "--device", device, "--crop", *crop,
                               "--amp", "off,bf16" if smoke else ",".join(PRECISIONS), "--steps", "1" if smoke else "3",
                               "--out", j("bench_memory.json")],
              70, "bench_memory.json"),
        Stage("inference", [py, f"{bench}/bench_inference.py", "--device", device, *inference_model, *infer,
                            "--out", j("inference.json")], 35, "inference.json"),
    ]
    if smoke:  # one thread per process (a loaded CI machine) and limits that only catch hangs
        for stage in stages:
            stage.env["OMP_NUM_THREADS"] = "1"
            stage.timeout_s = 600
    return stages


def run_stage(stage: Stage, out: Path) -> dict:
    """Run one stage; its log goes to OUT_DIR/<name>.log, its JSON (if any) into the record."""
    log = out / f"{stage.name}.log"
    t0 = time.perf_counter()
    env = os.environ | {"PYTHONUNBUFFERED": "1", "KINETO_LOG_LEVEL": "5"} | stage.env
    try:
        proc = subprocess.run(stage.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=stage.timeout_s)
        text, code = proc.stdout, proc.returncode
        status = "ok" if code == 0 else "failed"
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
        code, status = None, "timeout"
    log.write_text(text)
    record: dict[str, Any] = {"name": stage.name, "status": status, "returncode": code,
                              "seconds": round(time.perf_counter() - t0, 1), "command": stage.argv,
                              "log": log.name, "tail": text.strip().splitlines()[-8:]}
    if stage.json_name and (out / stage.json_name).is_file():
        record["result"] = json.loads((out / stage.json_name).read_text())
    if stage.name == "cuda_tests" and code == 5:  # pytest: no test collected
        record["status"] = "failed"
    return record


# --------------------------------------------------------------------------- training steps


def measured_steps(cfg: Any, steps: int) -> dict:
    """``steps`` steps of ``cfg``'s method on synthetic crops of its sizes (BatchNorm calibrated first):
    the losses, the step times, whether the weights changed, the peak GPU memory and the fp16 scale."""
    import tempfile

    import torch

    from sclseg.engine.trainer import Trainer

    from bench_memory import one_step, synthetic_batches
    from bench_step import synthetic_data

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir, data=synthetic_data(cfg, 19), show_progress=False)
        device = trainer.device
        calibrate_batchnorm(trainer, *synthetic_batches(trainer, steps))
        before = [p.detach().clone() for p in trainer.student.parameters()]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, losses = [], []
        for step in range(steps):
            batch, ubatch = synthetic_batches(trainer, step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            terms = one_step(trainer, batch, ubatch)
            losses.append(float(terms["loss"]))  # float() synchronises
            times.append(time.perf_counter() - t0)
        changed = any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.student.parameters()))
        scaler = trainer.method.scaler
        result = {"losses": losses, "step_s": times, "weights_changed": changed,
                  "losses_finite": all(math.isfinite(v) for v in losses),
                  "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                  "scaler_scale": float(scaler.get_scale()) if scaler is not None else None}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _rows(args: argparse.Namespace, settings: list[tuple[dict, str, list[str]]]) -> int:
    """Measure each ``(row, config, overrides)``, print it and rewrite ``args.out`` after every row (a stage
    stopped at its time limit keeps the rows it ran); 1 when a row failed."""
    from sclseg.config import load_config, resolve_config_path

    from bench_losses import write_json

    results, failures = [], 0
    for row, config, overrides in settings:
        label = " ".join(map(str, row.values()))
        try:
            cfg = load_config(resolve_config_path(config), overrides + [
                f"train.device={args.device}", "train.grad_accum=1", "method.unlabeled_start=0",
                "method.rampup_iters=0"])
            row |= {"config": config, "model": cfg.model.name, "method": cfg.method.name, "amp": cfg.train.amp,
                    "crop": list(cfg.data.crop_size), "batch": [cfg.data.batch_size, cfg.data.unlabeled_batch_size]}
            row |= measured_steps(cfg, args.steps)
            # fp16: the GradScaler may skip the first steps (inf gradients) while it lowers its scale
            row["status"] = "ok" if row["losses_finite"] and (row["weights_changed"] or row["amp"] == "fp16") \
                else "failed"
        except Exception as exc:  # an OOM or a kernel error of one setting must not hide the others
            row |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:500]}
        failures += row["status"] == "failed"
        peak = f", peak {_gb(row['peak_bytes'])} GB" if row.get("peak_bytes") else ""
        print(f"{label:<40}: {row['status']}"
              + (f", step {1e3 * min(row['step_s']):.0f} ms{peak}, losses {row['losses']}" if "step_s" in row else "")
              + (f" ({row['error']})" if "error" in row else ""), flush=True)
        results.append(row)
        write_json(args.out, {"device": args.device, "runs": results})
    return 1 if failures else 0


def train_steps(args: argparse.Namespace) -> int:
    """``steps`` subcommand: a few training steps of each model in each precision; JSON to ``--out``."""
    from sclseg.models import MODEL_NAMES

    models = args.models.split(",") if args.models else [m for m in MODEL_NAMES if m != "compact"]
    crop = f"data.crop_size=[{args.crop[0]}, {args.crop[1]}]"
    return _rows(args, [({"model": name, "amp": amp}, args.config,
                         [f"model.name={name}", f"train.amp='{amp}'", crop, "data.batch_size=1",
                          "data.unlabeled_batch_size=2"])
                        for name in models for amp in args.amp.split(",")])


#: The recipe each weak-to-strong method is measured on: its network, crop and batch as released.
METHOD_RECIPES = {
    "fixmatch": "cityscapes/fixmatch_resnet101_deepstem_1-8",
    "unimatch_v1": "cityscapes/fixmatch_resnet101_deepstem_1-8",
    "unimatch_v2": "cityscapes/unimatch_v2_dinov2_base_1-8",
}


def method_steps(args: argparse.Namespace) -> int:
    """``methods`` subcommand: a few steps of each weak-to-strong method and its ``_scl`` twin on its recipe
    (``--config`` replaces the recipe, ``--crop`` its crop); JSON to ``--out``."""
    from sclseg.config import load_config, resolve_config_path

    settings = []
    for base, recipe in METHOD_RECIPES.items():
        config = args.config or recipe
        for name in (base, f"{base}_scl"):
            overrides = [f"method.name={name}"]
            if args.crop:
                overrides.append(f"data.crop_size=[{args.crop[0]}, {args.crop[1]}]")
            if base == "unimatch_v1":  # UniMatch V1 fills its boxes from a second unlabeled batch of the same size
                unlabeled = load_config(resolve_config_path(config)).data.unlabeled_batch_size
                overrides.append(f"data.unlabeled_batch_size={2 * unlabeled}")
            settings.append(({"method": name}, config, overrides))
    return _rows(args, settings)


def calibrate_batchnorm(trainer: Any, batch: dict, ubatch: Optional[dict]) -> None:
    """Give the student's and the teacher's BatchNorm layers the statistics of one batch.

    Freshly initialised layers hold mean 0 and variance 1, so the teacher's eval-mode forward
    normalises nothing: through the 33 residual blocks of a random ResNet-101 its activations
    overflow float16 (a NaN loss, seen with CPU autocast), which pre-trained weights, with their
    statistics, do not. torch's ``update_bn`` (one train-mode pass, cumulative averages) sets them
    from the labeled and unlabeled images together; the teacher copies them.
    """
    import torch
    from torch.optim.swa_utils import update_bn

    from sclseg.teacher import unwrap

    network = unwrap(trainer.student)
    images = batch["image"] if ubatch is None else torch.cat([batch["image"], ubatch["image"]])
    with torch.no_grad():
        update_bn([images], network)
    trainer.mean_teacher.teacher.load_state_dict(network.state_dict())


# --------------------------------------------------------------------------- summary


def _gb(n: Optional[float]) -> str:
    return "" if n is None else f"{n / 1024**3:.2f}"


def _figures(record: dict) -> str:
    """The headline numbers of one stage, for the summary table."""
    r = record.get("result")
    if not r:
        return ""
    name = record["name"]
    if name.startswith("bench_step"):
        return (f"overhead_ratio {r['overhead_ratio']:.3f}, loop step {r['loop_step_ms']:.1f} ms, "
                f"train_step {r['train_step_ms']['median']:.1f} ms, network passes {r['network_pass_ms']:.1f} ms")
    if name == "bench_data" and r.get("comparison"):
        c = r["comparison"]
        return (f"{c['num_workers_per_stream']} workers per stream: " + ", ".join(
            f"{k} {v['delivered_images_per_s']:.1f} img/s ({v['delivered_how']}) for "
            f"{v['consumed_images_per_s']:.1f} consumed" for k, v in c["streams"].items()))
    if name in ("train_steps", "method_steps"):
        ok = sum(row["status"] == "ok" for row in r["runs"])
        return f"{ok}/{len(r['runs'])} {'model x precision' if name == 'train_steps' else 'method'} runs ok"
    if name == "bench_memory":
        return ", ".join(f"{x['activation_checkpointing']}/{x['amp']} {_gb(x['peak_bytes'])} GB {x['step_s']:.2f} s"
                         for x in r["runs"])
    return ""


def markdown(summary: dict) -> str:
    lines = [f"# GPU check: {summary['device_name']}", "",
             f"torch {summary['torch']}, CUDA {summary['cuda']}, {summary['started']}, "
             f"{summary['seconds']:.0f} s in all{' (CPU smoke run: toy sizes)' if summary['smoke'] else ''}", "",
             "| stage | status | seconds | figures |", "|---|---|---:|---|"]
    for s in summary["stages"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {_figures(s)} |")
    for stage, title in (("train_steps", "Training steps"), ("method_steps", "Steps of the weak-to-strong methods")):
        steps = next((s.get("result") for s in summary["stages"] if s["name"] == stage), None)
        if not steps:
            continue
        lines += ["", f"## {title} (synthetic data)", "", "| method | model | crop | batch | amp | status | "
                  "best step (ms) | peak (GB) | losses |", "|---|---|---|---|---|---|---:|---:|---|"]
        for row in steps["runs"]:
            best = f"{1e3 * min(row['step_s']):.0f}" if row.get("step_s") else ""
            losses = ", ".join(f"{v:.3f}" for v in row.get("losses", [])) or row.get("error", "")
            crop = "x".join(map(str, row.get("crop", [])))
            batch = " + ".join(map(str, row.get("batch", [])))
            cells = [row.get("method", ""), row.get("model", ""), crop, batch, row.get("amp", ""), row["status"], best,
                     _gb(row.get("peak_bytes")), losses]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    memory = next((s.get("result") for s in summary["stages"] if s["name"] == "bench_memory"), None)
    if memory:
        lines += ["", "## Memory of one scl step (bench_memory)", "",
                  "| crop | checkpointing | amp | peak allocated (GB) | reserved (GB) | step (s) |",
                  "|---|---|---|---:|---:|---:|"]
        for x in memory["runs"]:
            lines.append(f"| {x['crop'][0]}x{x['crop'][1]} | {x['activation_checkpointing']} | {x['amp']} | "
                         f"{_gb(x['peak_bytes'])} | {_gb(x['reserved_bytes'])} | {x['step_s']:.3f} |")
    failed = [s["name"] for s in summary["stages"] if s["status"] != "ok"]
    verdict = "All stages passed." if not failed else f"Not passed: {', '.join(failed)} (see their .log files)."
    lines += ["", verdict, ""]
    return "\n".join(lines)


def check(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (use --cpu-smoke for a CPU dry run)", file=sys.stderr)
        return 2
    started, t0 = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.perf_counter()
    records = []
    for stage in plan(out, args.cpu_smoke):
        print(f"[gpu_check] {stage.name} ...", flush=True)
        record = run_stage(stage, out)
        print(f"[gpu_check] {stage.name}: {record['status']} in {record['seconds']:.0f} s {_figures(record)}",
              flush=True)
        records.append(record)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    summary = {
        "smoke": args.cpu_smoke,
        "device_name": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "started": started,
        "seconds": time.perf_counter() - t0,
        "stages": records,
        "passed": all(r["status"] == "ok" for r in records),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "summary.md").write_text(markdown(summary))
    print(f"[gpu_check] wrote {out / 'summary.json'} and {out / 'summary.md'}; "
          f"{'all stages passed' if summary['passed'] else 'some stages did not pass'}")
    return 0 if summary["passed"] else 1


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="run every stage and write OUT_DIR/summary.{json,md}")
    p.add_argument("out_dir")
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU: checks the script, not the GPU")
    p.set_defaults(func=check)
    p = sub.add_parser("steps", help="a few training steps per model and precision (stage train_steps)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--config", default="cityscapes/scl_wrn38")
    p.add_argument("--models", default=None, help="comma-separated model names (default: every paper-scale model)")
    p.add_argument("--amp", default=",".join(PRECISIONS))
    p.add_argument("--crop", type=int, nargs=2, default=[800, 800], metavar=("H", "W"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True)
    p.set_defaults(func=train_steps)
    p = sub.add_parser("methods", help="a few steps of each weak-to-strong method on its recipe (stage method_steps)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--config", default=None, help="one config for every method (default: each method's recipe)")
    p.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"), help="default: the recipe's")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", required=True)
    p.set_defaults(func=method_steps)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
