"""Peak memory and time of one full training step, per activation-checkpointing and AMP setting.

One step is the method's :meth:`~sclseg.methods.Method.step` on synthetic batches of the crop size: the
teacher forward on the unlabeled images, the student forward+backward on the labeled and the
mixed images, the losses of the config's method, the SGD step and the EMA update. The pieces are
those of a :class:`sclseg.engine.trainer.Trainer` on synthetic data (model, EMA teacher, SGD +
poly lr, CutMix generator, AMP dtype and GradScaler; the trainer applies
``train.activation_checkpointing`` to the student). Every setting gets a fresh set-up with the same
seeds, ``--warmup`` steps
(so the gradients and the momentum buffers exist, as in a running job), one step whose memory
is measured and ``--steps`` timed steps.

``peak_bytes`` is everything allocated at the step's peak: the student's weights, gradients and
momentum, the teacher, the batches and the step's activations and temporaries.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (also
  ``max_memory_reserved``, what the caching allocator held; a GPU also needs its context, ~0.5 GB).
* CPU: the tensors alive before the step (unique storages of the parameters, gradients, buffers,
  optimizer state and batches) plus the peak of the running sum of the CPU allocator's allocation
  and free events during the step, read from ``torch.profiler`` (``profile_memory=True``).
  CPU kernels (oneDNN) keep other temporaries than cuDNN does: the CPU peak approximates the GPU's.

``peak_fwd_bwd_bytes`` is the peak up to the optimizer step (forward and backward passes, the
losses): the part that grows with the crop. After it come the SGD and EMA updates, whose
temporaries are a few weight-sized buffers: at small crops they, not the activations, set the peak.

With two or more ``--crop`` sizes, a line ``peak_fwd_bwd = a + b * H * W`` is fitted per setting
(least squares) and evaluated at ``--predict`` (default 800x800, the paper's crop).

Usage::

    python benchmarks/bench_memory.py --config cityscapes/scl_wrn38 --device cpu --crop 96 96 --crop 128 128 \\
        --out runs/bench/memory_wrn38_cpu.json
    python benchmarks/bench_memory.py --config cityscapes/scl_wrn38 --device cuda --crop 800 800 --amp off,bf16,fp16
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's start/stop lines off stderr

import torch

from sclseg.config import load_config, resolve_config_path
from sclseg.engine.trainer import Trainer
from sclseg.models.activation_checkpointing import CHECKPOINT_MODES
from sclseg.teacher import unwrap

from bench_losses import CpuLoad, chosen_device, cpu_allocation_peaks, fmt_bytes, machine_info, sync, write_json
from bench_step import synthetic_data

AMP_MODES = ("off", "bf16", "fp16")
OPTIMIZER_EVENT = "Optimizer.step#"  # torch.optim's record_function around every step()


def resident_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared tensors count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def live_tensors(trainer: Trainer, batches: list[Optional[dict]]) -> Iterable[torch.Tensor]:
    """Every tensor a step starts with: student and teacher, gradients, optimizer state, batches."""
    for module in (unwrap(trainer.student), trainer.mean_teacher.teacher):
        yield from module.parameters()
        yield from module.buffers()
    yield from (p.grad for p in trainer.student.parameters() if p.grad is not None)
    for state in trainer.optimizer.state.values():
        yield from (v for v in state.values() if torch.is_tensor(v))
    for batch in batches:
        if batch is not None:
            yield from (v for v in batch.values() if torch.is_tensor(v))


def synthetic_batches(trainer: Trainer, offset: int) -> tuple[dict, Optional[dict]]:
    """One labeled and one unlabeled batch of the config's sizes from the trainer's (synthetic) data."""
    d, data, device = trainer.cfg.data, trainer.data, trainer.device
    samples = [data.labeled[(offset + i) % len(data.labeled)] for i in range(d.batch_size)]
    batch = {"image": torch.stack([x["image"] for x in samples]).to(device),
             "mask": torch.stack([x["mask"] for x in samples]).to(device)}
    if not trainer.method.needs_unlabeled:
        return batch, None
    samples = [data.unlabeled[(offset + i) % len(data.unlabeled)] for i in range(d.unlabeled_batch_size)]
    images = torch.stack([x["image"] for x in samples]).to(device)
    # "ignore": the crops' padding maps (255 = padding) as the training crops give them; the synthetic
    # images are crop-sized, with no padding
    ignore = (torch.stack([x["ignore"] for x in samples]).to(device) if "ignore" in samples[0]
              else torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.uint8, device=device))
    return batch, {"image": images, "ignore": ignore}


def one_step(trainer: Trainer, batch: dict, ubatch: Optional[dict]) -> dict[str, torch.Tensor]:
    """One step of the trainer's method at unlabeled weight 1; its terms."""
    return trainer.method.step([batch], None if ubatch is None else [ubatch], 1.0)


def measure(args, crop: tuple[int, int], checkpointing: str, amp: str, device: torch.device) -> dict:
    """Build a fresh trainer for one setting, warm it up, then measure the peaks and the step time."""
    overrides = list(args.overrides) + [
        f"data.crop_size=[{crop[0]}, {crop[1]}]", f"train.amp='{amp}'",
        f"train.activation_checkpointing='{checkpointing}'",
        f"train.device={device.type}", "train.grad_accum=1", "method.unlabeled_start=0", "method.rampup_iters=0",
    ]
    cfg = load_config(resolve_config_path(args.config), overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir, data=synthetic_data(cfg, args.classes), show_progress=False)
        for i in range(args.warmup):
            one_step(trainer, *synthetic_batches(trainer, i))
        batch, ubatch = synthetic_batches(trainer, args.warmup)
        sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            at_update: list[int] = []
            hook = trainer.optimizer.register_step_pre_hook(
                lambda *_: at_update.append(torch.cuda.max_memory_allocated(device)))
            torch.cuda.reset_peak_memory_stats(device)
            one_step(trainer, batch, ubatch)
            sync(device)
            hook.remove()
            peak, peak_fwd_bwd = torch.cuda.max_memory_allocated(device), at_update[0]
            reserved: Optional[int] = torch.cuda.max_memory_reserved(device)
            method = "torch.cuda.max_memory_allocated (at the optimizer step's start, and at the end)"
        else:
            before = resident_bytes(live_tensors(trainer, [batch, ubatch]))
            during_fwd_bwd, during = cpu_allocation_peaks(lambda: one_step(trainer, batch, ubatch),
                                                          before=OPTIMIZER_EVENT)
            peak, peak_fwd_bwd, reserved = before + during, before + during_fwd_bwd, None
            method = "tensors alive before the step + torch.profiler peak of CPU allocations minus frees"
        times = [time.perf_counter() - t0]  # the measured step itself when --steps 0
        if args.steps:
            times = []
        for i in range(args.steps):
            batch, ubatch = synthetic_batches(trainer, args.warmup + 1 + i)
            sync(device)
            t0 = time.perf_counter()
            one_step(trainer, batch, ubatch)
            sync(device)
            times.append(time.perf_counter() - t0)
    d = cfg.data
    return {
        "activation_checkpointing": checkpointing,
        "amp": amp,
        "crop": list(crop),
        "peak_bytes": int(peak),
        "peak_fwd_bwd_bytes": int(peak_fwd_bwd),
        "reserved_bytes": reserved,
        "step_s": statistics.median(times),
        "step_s_all": [round(t, 4) for t in times],
        "step_timed": "separate steps" if args.steps else "the measured step (under the profiler on CPU)",
        "method": cfg.method.name,
        "model": cfg.model.name,
        "batch": {"labeled": d.batch_size, "unlabeled": d.unlabeled_batch_size},
        "memory_method": method,
    }


def fit_lines(runs: list[dict], predict: tuple[int, int]) -> list[dict]:
    """Per setting with >= 2 crop sizes: the least-squares line ``peak_fwd_bwd = a + b * pixels`` and
    the whole step's peak at ``predict``: the larger of the line there and the measured update-phase
    peaks (the SGD and EMA temporaries, which do not grow with the crop)."""
    fits = []
    settings = sorted({(r["activation_checkpointing"], r["amp"]) for r in runs}, key=lambda k: (
        CHECKPOINT_MODES.index(k[0]), AMP_MODES.index(k[1])))
    for ckpt, amp in settings:
        mine = [r for r in runs if r["activation_checkpointing"] == ckpt and r["amp"] == amp]
        points = sorted((r["crop"][0] * r["crop"][1], r["peak_fwd_bwd_bytes"]) for r in mine)
        if len({p for p, _ in points}) < 2:
            continue
        xs, ys = [p for p, _ in points], [b for _, b in points]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        intercept = my - slope * mx
        worst = max(abs(intercept + slope * x - y) / y for x, y in zip(xs, ys))
        line = intercept + slope * predict[0] * predict[1]
        fits.append({
            "activation_checkpointing": ckpt, "amp": amp, "bytes_per_pixel": slope, "intercept_bytes": intercept,
            "max_relative_residual": worst, "pixels": xs, "predict": list(predict),
            "predicted_fwd_bwd_bytes": line, "predicted_peak_bytes": max(line, max(r["peak_bytes"] for r in mine)),
        })
    return fits


def parse_list(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{flag}: expected a comma-separated subset of {','.join(allowed)}, "
                                         f"got {text!r}")
    return items


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cityscapes/scl_wrn38", help="packaged config name or YAML path")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--crop", type=int, nargs=2, action="append", metavar=("H", "W"), required=True,
                        help="crop size; repeat for several sizes (then a line is fitted per setting)")
    parser.add_argument("--checkpointing", default="off,encoder,all",
                        type=lambda t: parse_list(t, CHECKPOINT_MODES, "--checkpointing"))
    parser.add_argument("--amp", default="off,bf16", type=lambda t: parse_list(t, AMP_MODES, "--amp"))
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the measured ones (>= 1)")
    parser.add_argument("--steps", type=int, default=1,
                        help="timed steps after the memory step (0: time the memory step itself)")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    parser.add_argument("--predict", type=int, nargs=2, default=(800, 800), metavar=("H", "W"))
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. data.unlabeled_batch_size=2")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 0:
        parser.error("need --warmup >= 1 and --steps >= 0")
    if any(h < 16 or w < 16 for h, w in args.crop):
        parser.error("--crop: H and W must be >= 16")
    device = chosen_device(parser, args.device, args.threads)
    info = machine_info(device)
    print(f"device {info['device_name']} ({device.type}), torch {info['torch']}, {torch.get_num_threads()} threads",
          flush=True)

    load = CpuLoad()
    runs: list[dict] = []

    def save() -> None:
        if args.out:
            write_json(args.out, {
                "machine": info | {"torch_threads": torch.get_num_threads()},
                "command": " ".join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv))),
                "config": args.config,
                "overrides": args.overrides,
                "runs": runs,
                "fits": fit_lines(runs, tuple(args.predict)),
                "other_cpu_load": load.others(),
            })

    header = f"{'crop':>9} {'checkpointing':>13} {'amp':>5} {'peak':>11} {'fwd+bwd':>11} {'reserved':>11} {'step':>9}"
    print(header + "\n" + "-" * len(header), flush=True)
    for h, w in args.crop:
        for ckpt in args.checkpointing:
            for amp in args.amp:
                run = measure(args, (h, w), ckpt, amp, device)
                runs.append(run)
                print(f"{h:>4}x{w:<4} {ckpt:>13} {amp:>5} {fmt_bytes(run['peak_bytes']):>11} "
                      f"{fmt_bytes(run['peak_fwd_bwd_bytes']):>11} "
                      f"{fmt_bytes(run['reserved_bytes']):>11} {run['step_s']:8.3f}s", flush=True)
                save()  # after every run, so that an interrupted sweep keeps what it measured
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    fits = fit_lines(runs, tuple(args.predict))
    if fits:
        ph, pw = args.predict
        print(f"\nfit peak_fwd_bwd = a + b * H * W; whole-step peak at {ph}x{pw}:")
        for f in fits:
            print(f"  {f['activation_checkpointing']:>8} {f['amp']:>4}: "
                  f"b = {f['bytes_per_pixel'] / 1024:8.1f} KiB/pixel, "
                  f"a = {fmt_bytes(f['intercept_bytes'])}, worst residual {100 * f['max_relative_residual']:.1f}% "
                  f"-> {fmt_bytes(f['predicted_peak_bytes'])}")
    others = load.others()
    if others is not None:
        print(f"other processes used {others:.0%} of the CPUs meanwhile" + (" (noisy timings)" if others > 0.1 else ""))
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
