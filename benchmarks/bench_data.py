"""Images/s of the Cityscapes-size training data pipeline, per data worker.

The script writes ``--images`` synthetic Cityscapes-layout files into a temporary folder
(``leftImg8bit/{train,val}/bench/*_leftImg8bit.png`` RGB and ``gtFine/.../*_gtFine_labelIds.png``,
``--size`` WxH, default 2048x1024; smooth colour fields with noise, so the PNGs compress and
decode like photographs more than white noise would; blocky labelIds of the 19 evaluated
classes plus ignored ids), builds the data of ``--config`` (default ``cityscapes/scl_wrn38``:
random scale 0.5-2, 800x800 crop, flip, colour jitter, blur, class-uniform sampling on for the
labeled stream) with ``data.root`` pointing there, half the images labeled and half unlabeled,
and pulls batches from :func:`sclseg.data.stream.make_stream` (the trainer's streams) with
``num_workers`` in ``--workers``. It reports images/s for the labeled and the unlabeled stream,
per worker (workers = 0 counts as one: the main process), the one-time class-uniform centroid
scan, in the main process the decode time and the whole sample time, and the time of the
batch's colour jitter and blur, which the trainer applies on ``--device`` (not in the workers).

Consumption: a training step takes ``train.grad_accum`` micro-batches of ``data.batch_size``
labeled and ``data.unlabeled_batch_size`` unlabeled images; give the step time with ``--step-ms``
or ``--step-json`` (a bench_step.py JSON, whose own resolved config then gives the batch sizes and
``grad_accum`` of the step it timed) and the script compares, for ``data.num_workers`` workers
per stream (the trainer runs two streams, each with its own workers), the delivered rate
(measured, or per-worker rate times workers where that count was not measured: an upper bound,
the cores permitting) with the rate a step consumes.

Usage::

    python benchmarks/bench_data.py --images 16 --workers 0,1,2 --batches 6 --step-ms 900 --out runs/bench_data.json
    python benchmarks/bench_data.py --images 4 --size 512x256 --workers 0,1 --batches 2   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from sclseg.config import config_to_dict, load_config, resolve_config_path

from bench_losses import CpuLoad, machine_info, sync, write_json

# labelIds of the 19 evaluated Cityscapes classes, and some ignored ids (unlabeled, ego vehicle, ...)
TRAIN_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
IGNORED_IDS = [0, 1, 3, 4]
CITY = "bench"


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WxH, e.g. 2048x1024") from None
    if w < 16 or h < 16:
        raise argparse.ArgumentTypeError("size must be at least 16x16")
    return w, h


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError("need one or more integers >= 0")
    return values


def make_dataset(root: Path, n_train: int, size: tuple[int, int], seed: int) -> None:
    """Write ``n_train`` train images + labels and one val image + label in Cityscapes layout."""
    rng = np.random.default_rng(seed)
    width, height = size
    for split, count in (("train", n_train), ("val", 1)):
        (root / "leftImg8bit" / split / CITY).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / split / CITY).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            stem = f"{CITY}_{i:06d}_000019"
            coarse = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
            noisy = np.clip(smooth + rng.integers(-8, 9, smooth.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / "leftImg8bit" / split / CITY / f"{stem}_leftImg8bit.png")
            ids = np.array(TRAIN_LABEL_IDS + IGNORED_IDS, dtype=np.uint8)
            blocks = rng.choice(ids, size=(max(1, height // 32), max(1, width // 32)))
            label = np.asarray(Image.fromarray(blocks).resize((width, height), Image.NEAREST))
            Image.fromarray(label).save(root / "gtFine" / split / CITY / f"{stem}_gtFine_labelIds.png")


def time_stream(dataset, batch_size: int, workers: int, batches: int, warmup: int, photometric) -> dict:
    from sclseg.data.stream import make_stream

    stream = make_stream(dataset, batch_size, seed=1, num_workers=workers, photometric=photometric, name="bench")
    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            next(stream)
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(batches):
            next(stream)
        elapsed = time.perf_counter() - t0
    finally:
        stream.close()
    images = batches * batch_size
    rate = images / elapsed
    return {"workers": workers, "images": images, "seconds": elapsed, "images_per_s": rate,
            "images_per_s_per_worker": rate / max(workers, 1), "warmup_seconds": startup}


def main_process_costs(view, repeats: int) -> dict:
    """Decode-only and whole-sample times (ms) in this process, for the first images."""
    decode, sample = [], []
    n = len(view)
    for i in range(repeats):
        t0 = time.perf_counter()
        view.base.load(i % n)
        decode.append(time.perf_counter() - t0)
        torch.manual_seed(i)
        t0 = time.perf_counter()
        view[i % n]
        sample.append(time.perf_counter() - t0)
    return {"decode_ms": statistics.median(decode) * 1e3, "sample_ms": statistics.median(sample) * 1e3}


def photometric_costs(view, photometric, batch_size: int, device: torch.device, repeats: int) -> Optional[dict]:
    """Median ms of the batched colour jitter + blur on ``device`` for one batch of crops."""
    if photometric is None:
        return None
    images = torch.stack([view[i % len(view)]["image"] for i in range(batch_size)]).to(device)
    rows = torch.stack([photometric.draw(torch.Generator().manual_seed(i)) for i in range(batch_size)]).to(device)
    times = []
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        photometric(images, rows)
        sync(device)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times[1:]) * 1e3
    return {"device": device.type, "batch_size": batch_size, "ms_per_batch": ms, "ms_per_image": ms / batch_size}


def images_per_step(resolved: dict) -> dict[str, int]:
    """Images of each stream one optimizer step takes: ``grad_accum`` micro-batches of each batch
    size, from a resolved config as a dict (``config_to_dict``, or a bench_step JSON's ``resolved``)."""
    data, accum = resolved["data"], resolved["train"]["grad_accum"]
    return {"labeled": data["batch_size"] * accum, "unlabeled": data["unlabeled_batch_size"] * accum}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cityscapes/scl_wrn38",
                        help="a cityscapes config (its data section is used)")
    parser.add_argument("--images", type=int, default=16, help="synthetic train images written (half labeled)")
    parser.add_argument("--size", type=parse_size, default=(2048, 1024), help="image size WxH")
    parser.add_argument("--workers", type=parse_ints, default=parse_ints("0,1,2"), help="num_workers values to measure")
    parser.add_argument("--batches", type=int, default=6, help="timed batches per stream and worker count")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches first (default: max(1, workers))")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the main process (workers always use 1); default 1, like one worker")
    parser.add_argument("--step-ms", type=float, default=None, help="training step time to compare with (ms)")
    parser.add_argument("--step-json", default=None, help="bench_step.py JSON whose loop step time to compare with")
    parser.add_argument("--keep", default=None,
                        help="write the synthetic data set here and keep it (default: a temp dir)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where the batch's jitter and blur are timed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. data.crop_size=[512,512]")
    args = parser.parse_args(argv)
    if args.images < 4 or args.batches < 1:
        parser.error("need --images >= 4 and --batches >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)

    step_ms, step_cfg = args.step_ms, None
    if args.step_json:
        timed = json.loads(Path(args.step_json).read_text())
        step_ms, step_cfg = timed["loop_step_ms"], timed["config"]["resolved"]

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sclseg_bench_data_"))
    results: list[dict] = []
    load = CpuLoad()
    start = time.perf_counter()
    try:
        t0 = time.perf_counter()
        make_dataset(root, args.images, args.size, args.seed)
        make_s = time.perf_counter() - t0
        n_labeled = args.images // 2
        overrides = [f"data.root={root}", "data.cityscapes.extra_unlabeled=false",
                     f"data.cityscapes.labeled_count={n_labeled}", f"data.class_uniform.cache_dir={root / '.cache'}",
                     *args.overrides]
        cfg = load_config(resolve_config_path(args.config), overrides)
        if cfg.data.name != "cityscapes":
            parser.error(f"--config must be a cityscapes config, got data.name={cfg.data.name}")
        from sclseg.data import build_data
        from sclseg.data.transforms import build_photometric

        d = cfg.data
        config_workers = d.num_workers
        cfg.data.num_workers = 0  # the centroid scan's thread count: measure it single-threaded
        t0 = time.perf_counter()
        bundle = build_data(cfg)
        build_s = time.perf_counter() - t0
        info = machine_info(torch.device("cpu"))
        png = root / "leftImg8bit" / "train" / CITY / f"{CITY}_000000_000019_leftImg8bit.png"
        png_bytes = png.stat().st_size
        print(f"{info['cpu_model']}, {info['cpu_count']} CPUs, torch {info['torch']}; {args.images} synthetic "
              f"{args.size[0]}x{args.size[1]} PNGs ({png_bytes / 1e6:.1f} MB each) written in {make_s:.1f} s; "
              f"crop {d.crop_size[0]}x{d.crop_size[1]}, scale {d.scale_range}, class-uniform "
              f"{'on' if d.class_uniform.enabled else 'off'} (fraction {d.class_uniform.fraction}); "
              f"build_data incl. centroid scan of {n_labeled} labels: {build_s:.2f} s", flush=True)
        costs = main_process_costs(bundle.labeled, repeats=3)
        print(f"main process: decode {costs['decode_ms']:.0f} ms, labeled sample (decode + scale, crop, flip) "
              f"{costs['sample_ms']:.0f} ms", flush=True)
        photometric = build_photometric(d)
        jitter = photometric_costs(bundle.labeled, photometric, d.batch_size, torch.device(args.device), repeats=5)
        if jitter is not None:
            print(f"colour jitter + blur of a batch of {d.batch_size} on {args.device}: "
                  f"{jitter['ms_per_batch']:.1f} ms ({jitter['ms_per_image']:.1f} ms per image)", flush=True)

        streams = {"labeled": (bundle.labeled, d.batch_size), "unlabeled": (bundle.unlabeled, d.unlabeled_batch_size)}
        per_step = images_per_step(step_cfg or config_to_dict(cfg))
        for workers in args.workers:
            for name, (dataset, batch) in streams.items():
                warmup = args.warmup if args.warmup is not None else max(1, workers)
                r = time_stream(dataset, batch, workers, args.batches, warmup, photometric)
                r["stream"] = name
                r["batch_size"] = batch
                results.append(r)
                print(f"  {name:<9} workers={workers}: {r['images_per_s']:6.2f} img/s "
                      f"({r['images_per_s_per_worker']:.2f} per worker)", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    elapsed = time.perf_counter() - start
    others = load.others()

    print()
    header = f"{'stream':<10} {'workers':>7} {'img/s':>9} {'img/s/worker':>13} {'ms/img/worker':>14}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['stream']:<10} {r['workers']:>7} {r['images_per_s']:9.2f} {r['images_per_s_per_worker']:13.2f} "
              f"{1e3 / r['images_per_s_per_worker']:14.1f}")

    comparison = None
    if step_ms:
        w = config_workers
        comparison = {"step_ms": step_ms, "images_per_step": per_step, "num_workers_per_stream": w, "streams": {}}
        print()
        print(f"step {step_ms:.1f} ms taking {per_step['labeled']} labeled + {per_step['unlabeled']} unlabeled images, "
              f"data.num_workers={w} per stream (2 streams: {2 * max(w, 0)} workers in all):")
        for name in streams:
            need = per_step[name] / (step_ms / 1e3)
            rows = [r for r in results if r["stream"] == name]
            exact = next((r for r in rows if r["workers"] == w), None)
            if exact is not None:
                have, how = exact["images_per_s"], "measured"
            else:
                per = max(r["images_per_s_per_worker"] for r in rows)
                have, how = per * max(w, 1), "best per-worker rate x workers (upper bound)"
            ok = have >= need
            comparison["streams"][name] = {"consumed_images_per_s": need, "delivered_images_per_s": have,
                                           "delivered_how": how, "keeps_up": ok}
            print(f"  {name:<9} consumes {need:6.2f} img/s, delivers {have:6.2f} img/s ({how}): "
                  f"{'keeps up' if ok else 'DOES NOT keep up'}")
    print(f"total benchmark time {elapsed:.0f} s", end="")
    print("" if others is None else f"; other processes used {others:.0%} of the CPUs meanwhile"
          + (" (noisy run)" if others > 0.1 else ""))

    if args.out:
        payload = {
            "machine": info | {"torch_threads_main": torch.get_num_threads()},
            "config": {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]) if argv is None else argv,
                       "config": args.config, "overrides": overrides, "images": args.images,
                       "size_wh": list(args.size), "crop_size": d.crop_size, "scale_range": d.scale_range,
                       "class_uniform": d.class_uniform.enabled, "batches": args.batches},
            "png_bytes": png_bytes,
            "build_data_seconds": build_s,
            "main_process": costs,
            "photometric_on_device": jitter,
            "results": results,
            "comparison": comparison,
            "total_seconds": elapsed,
            "other_cpu_load": others,
        }
        write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
