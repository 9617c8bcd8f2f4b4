"""How much of a training step is the networks: the trainer's own loop against its network passes.

For a config (a packaged name such as ``digits/default`` or a YAML path, plus ``key=value``
overrides) and a method, the script builds a :class:`sclseg.engine.trainer.Trainer` in a
temporary folder and measures:

* ``loop``: ``--iters`` steps of :meth:`Trainer.run` itself (data streams, the method's step, the
  NaN watch, the metric window), timed by a step callback; no synchronisation inside, so GPU
  work overlaps the next step's host work as in training. Evaluation is off; logs and the
  checkpoint come after the timed steps.
* ``network``: the passes a step cannot avoid, on the trainer's own networks and batch shapes,
  each synchronised: the student forward and backward on the labeled + mixed images, and the
  teacher forward on the unlabeled images (supervised: the student on the labeled images).
* ``train_step``: one optimizer step of the method on one fixed step's batches (already on the
  device), synchronised: the network passes plus the method's own work (CutMix, softmaxes, losses,
  optimizer, EMA), without the data.
* ``data``: the part of a loop step that fetches its batches (both streams through the
  trainer's own fetch: loading, scale, crop, flip, to the device, colour jitter and blur),
  synchronised, from fresh streams of the same config.

``overhead_ratio = loop step time / network pass time``. The unlabeled terms run at full weight
from the first step (``method.unlabeled_start=0``, ``method.rampup_iters=0``), so the timed steps
are the semi-supervised steps. With data workers (``data.num_workers``), the loop overlaps most
of ``data`` with the steps.

``--compete N`` runs N busy processes (one spinning Python loop each) beside the timed steps: the
step time of a machine whose cores are shared, to choose ``train.threads`` for such machines.

``--synthetic`` replaces the data by random images of the crop size (blocky labels), for paper
scale without Cityscapes; the loop then still runs the real streams and augmentation.

Usage::

    python benchmarks/bench_step.py --config digits/default --method scl --device cpu --iters 30
    python benchmarks/bench_step.py --config cityscapes/scl_wrn38 --synthetic --device cuda --iters 20 \
        --out runs/bench_step_wrn38.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

import torch
from torch import Tensor

from sclseg.config import Config, config_to_dict, load_config, resolve_config_path
from sclseg.data import ClassInfo, DataBundle, SegmentationDataset
from sclseg.data.stream import Stream
from sclseg.engine.trainer import Trainer

from bench_losses import CpuLoad, fmt_bytes, machine_info, sync, write_json

TARGET_RATIO = 1.10


def summary(values_s: list[float]) -> dict:
    ms = [v * 1e3 for v in values_s]
    return {"median": statistics.median(ms), "min": min(ms), "mean": statistics.fmean(ms), "n": len(ms)}


class SyntheticScenes(SegmentationDataset):
    """``size`` random images ``(3, H, W)`` with blocky random labels of ``classes`` classes."""

    ignore_index = 255

    def __init__(self, size: int, crop: tuple[int, int], classes: int, *, labeled: bool) -> None:
        super().__init__(labeled=labeled)
        self.size, self.crop = size, crop
        self.classes = [ClassInfo(f"class{i}", (i, i, i)) for i in range(classes)]

    def __len__(self) -> int:
        return self.size

    def load(self, index: int) -> tuple[Tensor, Optional[Tensor], str]:
        gen = torch.Generator().manual_seed(index)
        h, w = self.crop
        image = torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
        coarse = torch.randint(0, len(self.classes), (math.ceil(h / 32), math.ceil(w / 32)), generator=gen)
        mask = coarse.repeat_interleave(32, 0).repeat_interleave(32, 1)[:h, :w].contiguous()
        return image, mask, f"synthetic{index}"


def synthetic_data(cfg: Config, classes: int) -> DataBundle:
    crop = (cfg.data.crop_size[0], cfg.data.crop_size[1])
    labeled = SyntheticScenes(64, crop, classes, labeled=True)
    return DataBundle(labeled, SyntheticScenes(64, crop, classes, labeled=False), {"val": labeled},
                      labeled.classes, labeled.ignore_index)


class StepTimes:
    """A step callback: the host time at the end of every step."""

    def __init__(self) -> None:
        self.marks = [time.perf_counter()]

    def __call__(self, trainer: Trainer, terms: dict) -> None:  # noqa: ARG002 - callback signature
        self.marks.append(time.perf_counter())

    def durations(self, skip: int) -> list[float]:
        return [b - a for a, b in zip(self.marks[skip:], self.marks[skip + 1:])]


def network_passes(trainer: Trainer, rounds: int) -> dict[str, list[float]]:
    """Synchronised student forward / backward and teacher forward on one step's batch shapes."""
    d, device = trainer.cfg.data, trainer.device
    images = torch.stack([trainer.data.labeled[i % len(trainer.data.labeled)]["image"]
                          for i in range(d.batch_size)]).to(device)
    semi = trainer.cfg.method.name != "supervised"
    unlabeled = torch.rand(d.unlabeled_batch_size, *images.shape[1:], device=device) if semi else None
    student_input = torch.cat([images, unlabeled]) if semi else images
    amp_dtype = trainer.method.amp_dtype
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    times: dict[str, list[float]] = {"student_fwd": [], "student_bwd": [], "teacher_fwd": []}
    trainer.student.train()
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            out = trainer.student(student_input)
        sync(device)
        t1 = time.perf_counter()
        out.float().sum().backward()
        sync(device)
        t2 = time.perf_counter()
        times["student_fwd"].append(t1 - t0)
        times["student_bwd"].append(t2 - t1)
        if semi:
            with torch.no_grad(), autocast:
                trainer.mean_teacher.teacher(unlabeled)
            sync(device)
            times["teacher_fwd"].append(time.perf_counter() - t2)
        trainer.optimizer.zero_grad(set_to_none=True)
    return {k: v for k, v in times.items() if v}


def fresh_streams(trainer: Trainer) -> list[Stream]:
    """The streams a step reads, opened from this run's position: labeled (and unlabeled)."""
    roles = ["labeled"] + (["unlabeled"] if trainer.method.needs_unlabeled else [])
    return [trainer._stream(role) for role in roles]


def train_steps(trainer: Trainer, rounds: int) -> list[float]:
    """Synchronised steps of the method at full unlabeled weight on one step's batches."""
    streams = fresh_streams(trainer)
    try:
        batches = [trainer._next_batches(stream) for stream in streams]
    finally:
        for stream in streams:
            stream.close()
    labeled, unlabeled = batches[0], batches[1] if len(batches) > 1 else None
    times = []
    for _ in range(rounds):
        sync(trainer.device)
        t0 = time.perf_counter()
        trainer.method.step(labeled, unlabeled, 0.0 if unlabeled is None else 1.0)
        sync(trainer.device)
        times.append(time.perf_counter() - t0)
    return times


def data_fetches(trainer: Trainer, rounds: int) -> list[float]:
    """Synchronised time of one step's batches, fetched as the loop fetches them, from fresh streams."""
    streams = fresh_streams(trainer)
    times = []
    try:
        for _ in range(rounds):
            sync(trainer.device)
            t0 = time.perf_counter()
            for stream in streams:
                trainer._next_batches(stream)
            sync(trainer.device)
            times.append(time.perf_counter() - t0)
    finally:
        for stream in streams:
            stream.close()
    return times


def competing_processes(n: int) -> list[subprocess.Popen]:
    """``n`` processes that each keep one core busy until killed."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="digits/default", help="packaged config name or YAML path")
    parser.add_argument("--method", choices=["supervised", "cl", "scl"], default=None, help="overrides method.name")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--iters", type=int, default=20, help="timed loop steps (and network rounds)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--synthetic", action="store_true", help="random images of the crop size instead of the data")
    parser.add_argument("--classes", type=int, default=19, help="classes of the model with --synthetic")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: train.threads)")
    parser.add_argument("--compete", type=int, default=0, help="busy processes running beside the timed steps")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.amp=bf16")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.compete < 0:
        parser.error("need --iters >= 1, --warmup >= 0 and --compete >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")

    steps = args.warmup + args.iters
    overrides = [*args.overrides, *([f"method.name={args.method}"] if args.method else []),
                 "method.unlabeled_start=0", "method.rampup_iters=0", f"train.iterations={steps}",
                 f"train.log_interval={steps}", f"train.checkpoint_interval={steps}", "train.keep_last=1"]
    if args.device != "auto":
        overrides.append(f"train.device={args.device}")
    if args.threads is not None:
        overrides.append(f"train.threads={args.threads}")
    cfg = load_config(resolve_config_path(args.config), overrides)
    data = synthetic_data(cfg, args.classes) if args.synthetic else None

    load = CpuLoad()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir, data=data, show_progress=False)
        device = trainer.device
        info = machine_info(device)
        n_params = sum(p.numel() for p in trainer.student.parameters())
        d = cfg.data
        print(f"device {info['device_name']} ({device.type}), torch {info['torch']}, {info['cpu_count']} CPUs, "
              f"{torch.get_num_threads()} torch threads\nconfig {args.config} method={cfg.method.name} "
              f"model={cfg.model.name} ({n_params / 1e6:.2f} M params) crop {d.crop_size[0]}x{d.crop_size[1]}, "
              f"{d.batch_size} labeled + {d.unlabeled_batch_size} unlabeled x grad_accum {cfg.train.grad_accum}, "
              f"amp={cfg.train.amp}; data: {'synthetic' if args.synthetic else cfg.data.name}", flush=True)
        timer = StepTimes()
        rivals = competing_processes(args.compete)
        try:
            trainer.run(evaluate=False, callbacks=[timer])
            sync(device)
        finally:
            for rival in rivals:
                rival.kill()
                rival.wait()
        loop = summary(timer.durations(args.warmup))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        network = {k: summary(v[args.warmup:] or v) for k, v in network_passes(trainer, steps).items()}
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        step = summary(train_steps(trainer, steps)[args.warmup:])
        fetch = summary(data_fetches(trainer, steps)[args.warmup:])
    elapsed = time.perf_counter() - start
    others = load.others()

    network_ms = sum(p["median"] for p in network.values()) * cfg.train.grad_accum
    ratio = loop["mean"] / network_ms
    for name, part in network.items():
        print(f"{name:<14} {part['median']:8.2f} ms (min {part['min']:.2f})")
    print(f"{'network passes':<14} {network_ms:8.2f} ms per step")
    print(f"{'train_step':<14} {step['median']:8.2f} ms (min {step['min']:.2f}): "
          f"{step['median'] - network_ms:.2f} ms of it beyond the network passes")
    print(f"{'data':<14} {fetch['median']:8.2f} ms per step (min {fetch['min']:.2f})")
    print(f"{'loop step':<14} {loop['mean']:8.2f} ms (mean of {loop['n']}; median {loop['median']:.2f}, "
          f"min {loop['min']:.2f})")
    if peak is not None:
        print(f"peak CUDA memory allocated by the network passes: {fmt_bytes(peak)}")
    met = ratio <= TARGET_RATIO
    print(f"overhead_ratio = {loop['mean']:.2f} / {network_ms:.2f} = {ratio:.3f}; target <= {TARGET_RATIO}: "
          f"{'MET' if met else 'NOT MET'}; total {elapsed:.0f} s"
          + ("" if others is None else f"; other processes used {others:.0%} of the CPUs"))
    if args.out:
        write_json(args.out, {
            "machine": info | {"torch_threads": torch.get_num_threads()},
            "config": {"command": " ".join(sys.argv if argv is None else ["bench_step.py", *argv]),
                       "config": args.config, "resolved": config_to_dict(cfg), "synthetic": args.synthetic,
                       "iters": args.iters, "warmup": args.warmup, "params": n_params,
                       "competing_processes": args.compete},
            "network_ms": network, "network_pass_ms": network_ms, "train_step_ms": step, "data_ms": fetch,
            "loop_step_ms": loop["mean"], "loop_step_summary_ms": loop,
            "overhead_ratio": ratio, "target": {"statement": f"overhead_ratio <= {TARGET_RATIO}", "met": met},
            "peak_cuda_bytes": peak,
            "total_seconds": elapsed, "other_cpu_load": others,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
