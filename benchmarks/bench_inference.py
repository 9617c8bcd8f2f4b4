"""Images/s and peak memory of whole-image, tiled, and multi-scale + flip evaluation.

Runs :func:`sclseg.engine.inference.predict_probs` on random images ``(--batch, 3, H, W)`` with a
randomly initialised model (``--model``, weights do not change the cost) in eval mode:

- ``whole``    one pass over the whole image
- ``tiled``    overlapping ``--tile`` windows (``--overlap``, default 1/3), exact averaging
- ``msflip``   ``--scales`` x {plain, flipped}, each with ``--ms-tile`` windows when given
               (the paper's test recipe: scales 0.5,1,2 + flip + 800x800 tiles on 1024x2048)

Timing: ``--warmup`` untimed calls per mode, then ``--repeats`` round-robin rounds; median and
min. On CUDA each call is bracketed by ``torch.cuda.synchronize()``. Peak memory: CUDA
``max_memory_allocated`` above what was allocated before the call; CPU: the profiler-based
peak of bench_losses.py (running sum of allocations minus frees during one call).

Usage::

    python benchmarks/bench_inference.py                                   # compact, 256x512, CPU
    python benchmarks/bench_inference.py --device cuda --model deeplabv3plus_wrn38 --size 1024x2048 \
        --tile 800x800 --scales 0.5,1,2 --ms-tile 800x800 --repeats 3 --out runs/bench_inference_wrn38.json
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Optional

import torch

from sclseg.config import ModelConfig
from sclseg.engine.inference import predict_probs, tile_starts
from sclseg.methods.base import AMP_DTYPES
from sclseg.models import MODEL_NAMES, create_model

from bench_losses import (
    CpuLoad,
    chosen_device,
    fmt_bytes,
    machine_info,
    peak_memory_cpu,
    peak_memory_cuda,
    sync,
    write_json,
)


def parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW, e.g. 512x1024") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return h, w


def parse_floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("scales must be > 0")
    return values


def count_passes(height: int, width: int, scales, flip: bool, tile, overlap: float) -> int:
    """Network calls of one predict_probs call (each on the whole batch)."""
    total = 0
    for scale in scales:
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        if tile:
            th, tw = tile
            ph, pw = max(h, th), max(w, tw)
            sh, sw = max(1, int(th * (1 - overlap))), max(1, int(tw * (1 - overlap)))
            n = len(tile_starts(ph, th, sh)) * len(tile_starts(pw, tw, sw))
        else:
            n = 1
        total += n * (2 if flip else 1)
    return total


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=MODEL_NAMES, default="compact")
    parser.add_argument("--width", type=int, default=16, help="compact model width (the digits default: 16)")
    parser.add_argument("--output-stride", type=int, choices=[8, 16], default=8)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--size", type=parse_hw, default=(256, 512), help="image HxW")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tile", type=parse_hw, default=None,
                        help="tile HxW of the tiled mode (default: half the image)")
    parser.add_argument("--overlap", type=float, default=1.0 / 3.0)
    parser.add_argument("--scales", type=parse_floats, default=parse_floats("0.5,1,2"))
    parser.add_argument("--ms-tile", type=parse_hw, default=None,
                        help="tiles in the multi-scale+flip mode (default: none)")
    parser.add_argument("--modes", default="whole,tiled,msflip")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default="off", help="autocast dtype of the forward passes")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass (slow on big CPU inputs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("need --repeats >= 1, --warmup >= 0, --batch >= 1")
    device = chosen_device(parser, args.device, args.threads)
    height, width = args.size
    tile = args.tile or (max(1, height // 2), max(1, width // 2))
    modes_all = {
        "whole": dict(scales=(1.0,), flip=False, tile=None),
        "tiled": dict(scales=(1.0,), flip=False, tile=tile),
        "msflip": dict(scales=tuple(args.scales), flip=True, tile=args.ms_tile),
    }
    names = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in names if m not in modes_all]
    if bad or not names:
        parser.error(f"--modes: unknown {bad}; choose from {', '.join(modes_all)}")
    modes = {m: modes_all[m] for m in names}

    torch.manual_seed(args.seed)
    model = create_model(ModelConfig(name=args.model, output_stride=args.output_stride, width=args.width), args.classes,
                         load_pretrained=False).to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = torch.rand(args.batch, 3, height, width, generator=torch.Generator().manual_seed(args.seed)).to(device)
    amp = AMP_DTYPES[args.amp]

    def run(spec):
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
        with ctx:
            return predict_probs(model, images, scales=spec["scales"], flip=spec["flip"], tile=spec["tile"],
                                 overlap=args.overlap)

    info = machine_info(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device {info['device_name']} ({device.type}), torch {info['torch']}, "
          f"{torch.get_num_threads()} torch threads; {args.model} ({n_params / 1e6:.2f} M params), "
          f"images {args.batch}x3x{height}x{width}, amp={args.amp}", flush=True)

    load = CpuLoad()
    start = time.perf_counter()
    for spec in modes.values():
        for _ in range(args.warmup):
            run(spec)
    sync(device)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for name, spec in modes.items():
            sync(device)
            t0 = time.perf_counter()
            out = run(spec)
            sync(device)
            times[name].append(time.perf_counter() - t0)
            del out
    results = []
    for name, spec in modes.items():
        peak = None
        if not args.no_memory:
            call = functools.partial(run, spec)
            peak = peak_memory_cuda(call, device) if device.type == "cuda" else peak_memory_cpu(call)
        ms = [t * 1e3 for t in times[name]]
        med = statistics.median(ms)
        results.append({
            "mode": name,
            "scales": list(spec["scales"]),
            "flip": spec["flip"],
            "tile": list(spec["tile"]) if spec["tile"] else None,
            "overlap": args.overlap if spec["tile"] else None,
            "network_calls": count_passes(height, width, spec["scales"], spec["flip"], spec["tile"], args.overlap),
            "ms": {"median": med, "min": min(ms), "all": [round(v, 3) for v in ms]},
            "images_per_s": args.batch / (med / 1e3),
            "peak_mem_bytes": peak,
        })
    elapsed = time.perf_counter() - start
    others = load.others()

    print()
    header = (f"{'mode':<8} {'scales':<14} {'flip':<5} {'tile':<10} {'calls':>5} {'median':>10} {'min':>10} "
              f"{'img/s':>8} {'peak mem':>11}")
    print(header)
    print("-" * len(header))
    for r in results:
        tile_text = "x".join(map(str, r["tile"])) if r["tile"] else "-"
        print(f"{r['mode']:<8} {','.join(f'{s:g}' for s in r['scales']):<14} {str(r['flip']):<5} {tile_text:<10} "
              f"{r['network_calls']:>5} {r['ms']['median']:8.1f}ms {r['ms']['min']:8.1f}ms {r['images_per_s']:8.2f} "
              f"{fmt_bytes(r['peak_mem_bytes']):>11}")
    print(f"total benchmark time {elapsed:.0f} s", end="")
    print("" if others is None else f"; other processes used {others:.0%} of the CPUs meanwhile"
          + (" (noisy run)" if others > 0.1 else ""))

    if args.out:
        payload = {
            "machine": info | {"torch_threads": torch.get_num_threads()},
            "config": {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]) if argv is None else argv,
                       "model": args.model, "width": args.width, "output_stride": args.output_stride,
                       "classes": args.classes, "params": n_params, "size": [height, width], "batch": args.batch,
                       "amp": args.amp, "channels_last": args.channels_last, "repeats": args.repeats,
                       "warmup": args.warmup},
            "results": results,
            "total_seconds": elapsed,
            "other_cpu_load": others,
        }
        write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
