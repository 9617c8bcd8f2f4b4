"""Time and memory of the sclseg losses, forward and forward+backward.

Cases, on random softmax maps ``(B, C, H, W)`` (student a leaf that requires grad, teacher
without grad) and owner maps from ``BoxMaskGenerator(n_boxes)``:

- ``cl``        consistency_loss (Eq. 4)
- ``scl``       structured_consistency_loss, sampled (n_boxes, last_boxes, max_pairs=9000), i.i.d. pairs
- ``scl_pixels`` the same with ``sampling="pixels"``: isqrt(max_pairs) pixels per region, all their pairs
- ``scl_exact`` structured_consistency_loss(..., max_pairs=None): exact Eq. 8 via Gram matrices
- ``scl_dense`` dense_structured_consistency_loss (Eq. 6), only where its (B, HW, HW) matrices
                fit the memory budget; otherwise recorded as skipped with the reason
- ``rbl``       relaxed_boundary_loss, window 3, on the student logits and blocky labels
- ``ce``        F.cross_entropy on the same logits and labels: the yardstick of ``rbl``

Timing: after ``--warmup`` untimed calls per case, ``--repeats`` rounds; each round runs every
case once (round-robin, so drift of the machine hits all cases alike), timing forward+backward
and then forward alone (autograd recording, graph discarded). Median and min in ms.
On CUDA each timed region is bracketed by ``torch.cuda.synchronize()``.

Memory: the peak of memory allocated during one forward+backward, above what was allocated
before it (so inputs are excluded, the gradient of the input is included).
CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``.
CPU: one extra forward+backward under ``torch.profiler`` with ``profile_memory=True``; the
allocation and free events of the CPU allocator are replayed in time order and the peak of
their running sum is reported.

Usage::

    python benchmarks/bench_losses.py --device cpu --sizes 128x256,256x512 --repeats 10 --out runs/bench.json
    python benchmarks/bench_losses.py --sizes 512x1024 --cases cl,scl,rbl,ce --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the profiler's start/stop lines off stderr

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sclseg.cutmix import BoxMaskGenerator  # noqa: E402
from sclseg.losses import (  # noqa: E402
    consistency_loss,
    dense_structured_consistency_loss,
    relaxed_boundary_loss,
    structured_consistency_loss,
)

LABELS = {
    "cl": "CL (Eq. 4)",
    "scl": "SCL sampled (Eq. 9-10)",
    "scl_pixels": "SCL sampled pixels",
    "scl_exact": "SCL exact (Eq. 8)",
    "scl_dense": "SCL dense (Eq. 6)",
    "rbl": "RBL w=3 (Eq. 2)",
    "ce": "plain CE",
}
TARGET_SIZE = (512, 1024)
# dense Eq. 6 peaks at about this many (B, HW, HW) float32 matrices during forward+backward
# (measured with this script on CPU: 5.0x at 32x64 and at 64x128)
DENSE_MATRICES = 5


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            h, w = (int(v) for v in item.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"size {item!r} is not HxW, e.g. 512x1024") from None
        if h < 1 or w < 1:
            raise argparse.ArgumentTypeError(f"size {item!r} must be positive")
        sizes.append((h, w))
    if not sizes:
        raise argparse.ArgumentTypeError("no sizes given")
    return sizes


def parse_cases(text: str) -> list[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in cases if c not in LABELS]
    if unknown or not cases:
        raise argparse.ArgumentTypeError(f"unknown case(s) {unknown or text!r}; choose from {','.join(LABELS)}")
    return cases


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def write_json(path: str, payload: dict) -> None:
    """Write a benchmark's JSON result, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def chosen_device(parser, device: str, threads) -> torch.device:
    """The ``--device`` of a benchmark, after ``--threads`` is applied; a parser error when CUDA
    is asked for and absent, or ``--threads`` is below 1."""
    if threads is not None and threads < 1:
        parser.error("--threads must be >= 1")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if threads:
        torch.set_num_threads(threads)
    return torch.device(device)


def machine_info(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_memory_bytes"] = props.total_memory
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info["cpu_model"]
    return info


class CpuLoad:
    """CPU time used by *other* processes over an interval, from /proc/stat and os.times().

    The benchmark cannot stop other work on a shared machine; it measures and records it so
    that a noisy run can be recognised (``others`` is a fraction of all cores, 0..1).
    """

    def __init__(self) -> None:
        self.start = self._snapshot()

    @staticmethod
    def _snapshot() -> Optional[tuple[float, float, float]]:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        busy_s = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal, no guest
        own = os.times()
        return busy_s, own.user + own.system, time.perf_counter()

    def others(self) -> Optional[float]:
        end = self._snapshot()
        if self.start is None or end is None:
            return None
        busy, own, wall = (b - a for a, b in zip(self.start, end))
        if wall <= 0:
            return None
        return max(0.0, min(1.0, (busy - own) / (wall * (os.cpu_count() or 1))))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    if n >= 1024**4:
        return f"{n / 1024**4:.1f} TiB"
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    return f"{n / 1024**2:.1f} MiB"


def cpu_allocation_peaks(step: Callable[[], None], before: Optional[str] = None) -> Optional[tuple[int, int]]:
    """Peaks of the running sum of CPU allocations minus frees during ``step`` (bytes above the start):
    ``(peak before the first profiler event named ``before...``, peak of the whole step)``."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    nodes = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    cut = min((n.start_time_ns for n in nodes if before and n.name.startswith(before)), default=None)
    events = sorted((n for n in nodes if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu"),
                    key=lambda n: n.start_time_ns)
    running = peak = peak_before = 0
    for node in events:
        running += node.extra_fields.alloc_size  # negative for a free
        peak = max(peak, running)
        if cut is None or node.start_time_ns < cut:
            peak_before = max(peak_before, running)
    return peak_before, peak


def peak_memory_cpu(step: Callable[[], None]) -> Optional[int]:
    """Peak of the running sum of CPU allocations minus frees during ``step`` (bytes)."""
    peaks = cpu_allocation_peaks(step)
    return None if peaks is None else peaks[1]


def peak_memory_cuda(step: Callable[[], None], device: torch.device) -> int:
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def summary(values_s: list[float]) -> dict:
    ms = [v * 1e3 for v in values_s]
    return {"median": statistics.median(ms), "min": min(ms), "all": [round(v, 3) for v in ms]}


def dense_need_bytes(batch: int, height: int, width: int) -> int:
    hw = height * width
    return DENSE_MATRICES * batch * hw * hw * 4


def bench_size(args, device: torch.device, height: int, width: int, dense_budget: int) -> list[dict]:
    batch, classes = args.batch, args.classes
    size = f"{height}x{width}"
    load = CpuLoad()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    cpu_gen = torch.Generator().manual_seed(args.seed)

    student_logits = (2.0 * torch.randn(batch, classes, height, width, generator=cpu_gen)).to(device)
    student_logits.requires_grad_(True)
    student = student_logits.detach().softmax(1).requires_grad_(True)
    teacher = (2.0 * torch.randn(batch, classes, height, width, generator=cpu_gen)).softmax(1).to(device)
    owner = BoxMaskGenerator(args.n_boxes)(batch, height, width, generator=cpu_gen).to(device)
    # piecewise-constant labels (16x16 blocks) for the boundary-relaxed CE
    coarse = torch.randint(0, classes, (batch, 1, math.ceil(height / 16), math.ceil(width / 16)), generator=cpu_gen)
    target = coarse.repeat_interleave(16, 2).repeat_interleave(16, 3)[:, 0, :height, :width].contiguous().to(device)

    def scl(**kw) -> Callable[[], torch.Tensor]:
        return lambda: structured_consistency_loss(
            student, teacher, owner, n_boxes=args.n_boxes, last_boxes=args.last_boxes, generator=gen, **kw
        )

    cases: dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor]] = {
        "cl": (lambda: consistency_loss(student, teacher), student),
        "scl": (scl(max_pairs=args.max_pairs), student),
        "scl_pixels": (scl(max_pairs=args.max_pairs, sampling="pixels"), student),
        "scl_exact": (scl(max_pairs=None), student),
        "scl_dense": (lambda: dense_structured_consistency_loss(student, teacher), student),
        "rbl": (lambda: relaxed_boundary_loss(student_logits, target, window=3), student_logits),
        "ce": (lambda: F.cross_entropy(student_logits, target, ignore_index=255), student_logits),
    }
    cases = {name: case for name, case in cases.items() if name in args.cases}

    records: dict[str, dict] = {}
    for name in cases:
        records[name] = {"loss": name, "label": LABELS[name], "size": size, "height": height, "width": width}
    need = dense_need_bytes(batch, height, width)
    if "scl_dense" in cases:
        records["scl_dense"]["estimated_peak_bytes"] = need
    if "scl_dense" in cases and need > dense_budget:
        records["scl_dense"].update(
            status="skipped",
            reason=(
                f"needs ~{fmt_bytes(need)} ({DENSE_MATRICES} x (B, HW, HW) float32 matrices, HW={height * width}), "
                f"budget {fmt_bytes(dense_budget)}"
            ),
        )
        del cases["scl_dense"]

    def fwd_bwd(fn: Callable[[], torch.Tensor], leaf: torch.Tensor) -> None:
        leaf.grad = None
        fn().backward()

    def fwd(fn: Callable[[], torch.Tensor]) -> None:
        with torch.enable_grad():
            loss = fn()
        del loss

    active = dict(cases)
    for name, (fn, leaf) in list(active.items()):
        try:
            for _ in range(args.warmup):
                fwd_bwd(fn, leaf)
                fwd(fn)
            sync(device)
        except RuntimeError as err:  # out of memory and the like: record, go on
            records[name].update(status="failed", reason=str(err).splitlines()[0][:300])
            del active[name]
            leaf.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()

    times_fb: dict[str, list[float]] = {n: [] for n in active}
    times_f: dict[str, list[float]] = {n: [] for n in active}
    for _ in range(args.repeats):
        for name, (fn, leaf) in active.items():
            leaf.grad = None
            sync(device)
            t0 = time.perf_counter()
            fn().backward()
            sync(device)
            times_fb[name].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            with torch.enable_grad():
                loss = fn()
            sync(device)
            times_f[name].append(time.perf_counter() - t0)
            del loss

    for name, (fn, leaf) in active.items():
        if device.type == "cuda":
            peak = peak_memory_cuda(functools.partial(fwd_bwd, fn, leaf), device)
            method = "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before"
        else:
            peak = peak_memory_cpu(functools.partial(fwd_bwd, fn, leaf))
            method = "torch.profiler profile_memory: peak running sum of CPU allocations minus frees"
        leaf.grad = None
        records[name].update(
            status="ok",
            fwd_bwd_ms=summary(times_fb[name]),
            fwd_ms=summary(times_f[name]),
            peak_mem_bytes=peak,
            peak_mem_method=method,
        )
        print(
            f"  {size:>10} {LABELS[name]:<24} fwd+bwd {records[name]['fwd_bwd_ms']['median']:9.1f} ms"
            f"  fwd {records[name]['fwd_ms']['median']:9.1f} ms  peak {fmt_bytes(peak)}",
            file=sys.stderr,
            flush=True,
        )
    others = load.others()
    for record in records.values():
        record["other_cpu_load"] = others
    if others is not None and others > 0.1:
        print(f"  warning: other processes used {others:.0%} of the CPUs while {size} ran", file=sys.stderr)
    return list(records.values())


def print_table(results: list[dict]) -> None:
    header = (
        f"{'size':>10}  {'loss':<24} {'fwd+bwd med':>12} {'fwd+bwd min':>12} "
        f"{'fwd med':>10} {'fwd min':>10} {'peak mem':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if r.get("status") != "ok":
            print(f"{r['size']:>10}  {r['label']:<24} {r.get('status', '?')}: {r.get('reason', '')}")
            continue
        fb, f = r["fwd_bwd_ms"], r["fwd_ms"]
        print(
            f"{r['size']:>10}  {r['label']:<24} {fb['median']:10.1f}ms {fb['min']:10.1f}ms "
            f"{f['median']:8.1f}ms {f['min']:8.1f}ms {fmt_bytes(r['peak_mem_bytes']):>11}"
        )


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("128x256,256x512,512x1024,1024x2048"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per size (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per case before timing")
    parser.add_argument("--n-boxes", type=int, default=32)
    parser.add_argument("--last-boxes", type=int, default=16)
    parser.add_argument("--max-pairs", type=int, default=9000)
    parser.add_argument(
        "--dense-budget-gb",
        type=float,
        default=None,
        help="memory budget for dense Eq. 6 (default: half the available RAM on CPU, 80%% of free GPU memory)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cases", type=parse_cases, default=list(LABELS), help=f"comma-separated subset of {','.join(LABELS)}"
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.classes < 2:
        parser.error("need --repeats >= 1, --warmup >= 0, --batch >= 1, --classes >= 2")

    device = chosen_device(parser, args.device, args.threads)
    if args.dense_budget_gb is not None:
        dense_budget = int(args.dense_budget_gb * 1024**3)
    elif device.type == "cuda":
        dense_budget = int(0.8 * torch.cuda.mem_get_info(device)[0])
    else:
        avail = mem_available_bytes()
        dense_budget = avail // 2 if avail else 4 * 1024**3

    info = machine_info(device)
    print(
        f"device {info['device_name']} ({device.type}), torch {info['torch']}, "
        f"{info['cpu_count']} CPUs, {info['torch_threads']} torch threads; "
        f"B={args.batch} C={args.classes} repeats={args.repeats} warmup={args.warmup}; "
        f"dense budget {fmt_bytes(dense_budget)}",
        flush=True,
    )

    results: list[dict] = []
    total_load = CpuLoad()
    start = time.perf_counter()
    for height, width in args.sizes:
        print(f"[{time.perf_counter() - start:7.1f}s] size {height}x{width}", file=sys.stderr, flush=True)
        results.extend(bench_size(args, device, height, width, dense_budget))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the size's tensors are gone with its frame
    elapsed = time.perf_counter() - start
    others = total_load.others()

    print()
    print_table(results)

    def find(loss: str, size: str) -> Optional[dict]:
        for r in results:
            if r["loss"] == loss and r["size"] == size and r.get("status") == "ok":
                return r
        return None

    ratios = []
    print()
    print("sampled SCL / CL, forward+backward:")
    for variant in ("scl", "scl_pixels"):
        for height, width in args.sizes:
            size = f"{height}x{width}"
            scl, cl = find(variant, size), find("cl", size)
            if scl is None or cl is None:
                continue
            entry = {
                "loss": variant,
                "size": size,
                "scl_ms_median": scl["fwd_bwd_ms"]["median"],
                "cl_ms_median": cl["fwd_bwd_ms"]["median"],
                "ratio_median": scl["fwd_bwd_ms"]["median"] / cl["fwd_bwd_ms"]["median"],
                "ratio_min": scl["fwd_bwd_ms"]["min"] / cl["fwd_bwd_ms"]["min"],
            }
            ratios.append(entry)
            print(
                f"  {variant:>10} {size:>10}: {entry['ratio_median']:.2f}x (medians {entry['scl_ms_median']:.1f} / "
                f"{entry['cl_ms_median']:.1f} ms), {entry['ratio_min']:.2f}x on the min times"
            )

    target_size = f"{TARGET_SIZE[0]}x{TARGET_SIZE[1]}"
    targets = []
    for variant in ("scl", "scl_pixels"):
        target = {"statement": f"{LABELS[variant]} fwd+bwd <= CL fwd+bwd at {target_size} (medians)",
                  "loss": variant, "size": target_size}
        hit = next((e for e in ratios if e["size"] == target_size and e["loss"] == variant), None)
        if hit is None:
            target.update(met=None, note=f"{target_size} was not benchmarked")
            print(f"target for {variant}: not evaluated ({target_size} not in --sizes)")
        else:
            met = hit["scl_ms_median"] <= hit["cl_ms_median"]
            target.update(met=met, ratio=hit["ratio_median"], gap_ms=hit["scl_ms_median"] - hit["cl_ms_median"])
            verdict = "MET" if met else "NOT MET"
            print(
                f"target {target['statement']}: {verdict} "
                f"(ratio {hit['ratio_median']:.2f}, SCL {hit['scl_ms_median']:.1f} ms "
                f"vs CL {hit['cl_ms_median']:.1f} ms)"
            )
        targets.append(target)
    target = {"statement": f"{LABELS['rbl']} fwd+bwd <= 2 x plain CE fwd+bwd at {target_size} (medians)",
              "loss": "rbl", "size": target_size}
    rbl, ce = find("rbl", target_size), find("ce", target_size)
    if rbl is None or ce is None:
        target.update(met=None, note=f"rbl and ce at {target_size} were not both benchmarked")
        print("target for rbl: not evaluated (needs the rbl and ce cases at 512x1024)")
    else:
        ratio = rbl["fwd_bwd_ms"]["median"] / ce["fwd_bwd_ms"]["median"]
        target.update(met=ratio <= 2.0, ratio=ratio, ratio_min=rbl["fwd_bwd_ms"]["min"] / ce["fwd_bwd_ms"]["min"])
        print(
            f"target {target['statement']}: {'MET' if ratio <= 2.0 else 'NOT MET'} (ratio {ratio:.2f}, "
            f"RBL {rbl['fwd_bwd_ms']['median']:.1f} ms vs CE {ce['fwd_bwd_ms']['median']:.1f} ms)"
        )
    targets.append(target)
    print(f"total benchmark time {elapsed:.0f} s", end="")
    if others is None:
        print()
    else:
        print(f"; other processes used {others:.0%} of the CPUs meanwhile" + (" (noisy run)" if others > 0.1 else ""))

    if args.out:
        payload = {
            "machine": info,
            "config": {
                "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]) if argv is None else argv,
                "batch": args.batch,
                "classes": args.classes,
                "sizes": [f"{h}x{w}" for h, w in args.sizes],
                "repeats": args.repeats,
                "warmup": args.warmup,
                "n_boxes": args.n_boxes,
                "last_boxes": args.last_boxes,
                "max_pairs": args.max_pairs,
                "rbl_window": 3,
                "cases": args.cases,
                "dtype": "float32",
                "dense_budget_bytes": dense_budget,
                "dense_matrices_estimate": DENSE_MATRICES,
                "threads": torch.get_num_threads(),
                "seed": args.seed,
            },
            "results": results,
            "scl_over_cl": ratios,
            "targets": targets,
            "total_seconds": elapsed,
            "other_cpu_load": others,
        }
        write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
