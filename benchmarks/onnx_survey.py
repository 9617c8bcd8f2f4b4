"""Which registered models export to ONNX, and how closely onnxruntime's logits follow PyTorch's.

For every name in :data:`sclseg.models.MODEL_NAMES` (or ``--models``): the network with random
weights (``model.pretrained`` null, ``--classes`` classes, ``compact`` at ``model.width=8``; every
floating tensor ``0.1 * N(0, 1)``, BatchNorm running variances ``|v| + 0.5`` so that they are valid),
saved as an sclseg weights file, written as ONNX by :func:`sclseg.export.export_onnx` (dynamic batch,
height and width) to a temporary folder, and run by onnxruntime on the CPU at two input sizes, each
with batch 1 and 2, from that one file. Against the PyTorch model in eval mode, per case:

- ``max_rel_diff``: ``max |onnx - torch| / max |torch|`` (the largest logit sets the scale)
- ``argmax_agreement``: fraction of pixels with the same argmax class

A model is ``ok`` when every case is within ``--tol`` (1e-4) and agrees on at least ``--agree``
(99.9%) of pixels; ``mismatch`` otherwise; ``export failed`` with the exporter's reason (the first
line of its message) when no file could be written; ``run failed`` with onnxruntime's reason when
the file does not run at a survey size (the file is then also compared at the size the exporter
traced it at, ``at_traced_size``). Sizes: multiples of the patch for the DPT models (DINOv2 14,
DINOv3 16), any sides for the convnets.

Usage::

    python benchmarks/onnx_survey.py --out runs/bench/onnx_survey.json
    python benchmarks/onnx_survey.py --models dpt_dinov3_small --off-patch   # also at 72x100 and 100x72
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sclseg.config import ConfigError, config_to_dict, load_config, resolve_config_path
from sclseg.engine.checkpoint import WEIGHTS_FORMAT
from sclseg.export import DEFAULT_OPSET, EXAMPLE_SIDE, export_onnx
from sclseg.models import MODEL_NAMES, create_model

from bench_losses import CpuLoad, machine_info, write_json

#: (height, width) pairs per patch size; the convnets take any side (at least 32).
SIZES = {
    14: [(56, 84), (84, 56)],
    16: [(64, 96), (96, 64)],
    None: [(64, 96), (96, 64)],
}
BATCHES = (1, 2)
#: --off-patch: sides of no patch's multiple, for the DPT models' resize to a multiple and back.
OFF_PATCH = [(72, 100), (100, 72)]


def patch_of(model: torch.nn.Module) -> Optional[int]:
    """The encoder's patch size (the DPT models: 14 for DINOv2, 16 for DINOv3); None for the convnets."""
    return getattr(getattr(model, "encoder", None), "patch_size", None)


def random_weights_file(folder: Path, name: str, num_classes: int, seed: int) -> tuple[Path, torch.nn.Module]:
    """An sclseg weights file of ``name`` with random tensors, and its network in eval mode."""
    overrides = [f"model.name={name}", "model.pretrained=null", "model.width=8"]
    cfg = load_config(resolve_config_path("digits/default"), overrides)
    model = create_model(cfg.model, num_classes, load_pretrained=False).eval()
    g = torch.Generator().manual_seed(seed)
    state = {k: 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()})
    names = [f"class{i}" for i in range(num_classes)]
    colors = [[(37 * i) % 256, (91 * i) % 256, (151 * i) % 256] for i in range(num_classes)]
    path = folder / f"{name}.pt"
    torch.save({"format": WEIGHTS_FORMAT, "model": model.state_dict(), "weights": "teacher",
                "config": config_to_dict(cfg), "num_classes": num_classes, "class_names": names,
                "class_colors": colors, "iteration": 0, "source": "onnx_survey"}, path)
    return path, model


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def compare(session, model: torch.nn.Module, shape: tuple[int, int, int, int]) -> dict:
    """One input shape: PyTorch's and onnxruntime's logits on the same random images."""
    images = torch.rand(shape, generator=torch.Generator().manual_seed(shape[0] * 1000 + shape[-1]))
    with torch.no_grad():
        expected = model(images).numpy()
    case: dict = {"shape": list(shape), "torch_max_abs": float(np.abs(expected).max())}
    try:
        logits = session.run(["logits"], {"images": images.numpy()})[0]
    except Exception as exc:  # onnxruntime's own exception types
        case.update(max_rel_diff=None, argmax_agreement=None, error=first_line(exc))
        return case
    case["output_shape"] = list(logits.shape)
    if logits.shape != expected.shape:
        case.update(max_rel_diff=None, argmax_agreement=None, error=f"output shape {logits.shape}, "
                    f"PyTorch {expected.shape}")
        return case
    case["max_rel_diff"] = float(np.abs(logits - expected).max() / np.abs(expected).max())
    case["argmax_agreement"] = float((logits.argmax(1) == expected.argmax(1)).mean())
    return case


def survey_one(name: str, args, folder: Path) -> dict:
    import onnxruntime

    path, model = random_weights_file(folder, name, args.classes, args.seed)
    row: dict = {"model": name, "patch": patch_of(model)}
    row["parameters"] = sum(p.numel() for p in model.parameters())
    out = folder / f"{name}.onnx"
    start = time.perf_counter()
    try:
        export_onnx(path, out, opset=args.opset)
    except ConfigError as exc:
        row["export_s"] = time.perf_counter() - start
        message = str(exc)
        marker = "cannot be exported to ONNX: "
        row.update(status="export failed", reason=message.split(marker, 1)[-1])
        return row
    row["export_s"] = time.perf_counter() - start
    row["onnx_bytes"] = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(out.name))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    cases = [compare(session, model, (batch, 3, h, w)) for h, w in SIZES[row["patch"]] for batch in BATCHES]
    row["cases"] = cases
    rel = [c["max_rel_diff"] for c in cases]
    agree = [c["argmax_agreement"] for c in cases]
    if None in rel:
        failed = next(c for c in cases if c["max_rel_diff"] is None)
        row.update(status="run failed", max_rel_diff=None, argmax_agreement=None,
                   reason=f"at {'x'.join(map(str, failed['shape']))}: {failed['error']}")
        # the size the graph was traced at, to tell a graph fixed to that size from one that never runs
        row["at_traced_size"] = compare(session, model, (1, 3, EXAMPLE_SIDE, EXAMPLE_SIDE))
        return row
    row["max_rel_diff"], row["argmax_agreement"] = max(rel), min(agree)
    good = row["max_rel_diff"] <= args.tol and row["argmax_agreement"] >= args.agree
    row["status"] = "ok" if good else "mismatch"
    if args.off_patch and row["patch"]:
        # sides that are not multiples of the patch: PyTorch resizes them to one and back (recorded only)
        row["off_patch_cases"] = [compare(session, model, (batch, 3, h, w)) for h, w in OFF_PATCH for batch in BATCHES]
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'model':34s} {'status':14s} {'export s':>9s} {'MB':>8s} {'max rel diff':>13s} {'argmax agree':>13s}")
    for r in rows:
        mb = f"{r['onnx_bytes'] / 1e6:8.1f}" if "onnx_bytes" in r else f"{'-':>8s}"
        rel = f"{r['max_rel_diff']:13.2e}" if r.get("max_rel_diff") is not None else f"{'-':>13s}"
        agree = f"{100 * r['argmax_agreement']:12.3f}%" if r.get("argmax_agreement") is not None else f"{'-':>13s}"
        print(f"{r['model']:34s} {r['status']:14s} {r.get('export_s', 0):9.1f} {mb} {rel} {agree}")
        if r.get("reason"):
            print(f"    {r['reason']}")
        for case in r.get("off_patch_cases", []):
            where = "x".join(map(str, case["shape"]))
            if case["max_rel_diff"] is None:
                print(f"    off the patch, {where}: {case['error']}")
            else:
                print(f"    off the patch, {where}: max rel diff {case['max_rel_diff']:.2e}, "
                      f"argmax agreement {100 * case['argmax_agreement']:.3f}%")
        traced = r.get("at_traced_size")
        if traced:
            where = "x".join(map(str, traced["shape"]))
            if traced["max_rel_diff"] is None:
                print(f"    at {where} (the traced size): {traced['error']}")
            else:
                print(f"    at {where} (the traced size): max rel diff {traced['max_rel_diff']:.2e}, "
                      f"argmax agreement {100 * traced['argmax_agreement']:.3f}%")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODEL_NAMES),
                        help="comma-separated model names (default: every registered model)")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-4, help="largest max |onnx - torch| / max |torch|")
    parser.add_argument("--agree", type=float, default=0.999, help="smallest argmax agreement")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    parser.add_argument("--off-patch", action="store_true",
                        help="also run the DPT models at sides off the patch (recorded, not judged)")
    parser.add_argument("--out", default=None, help="write JSON here (rewritten after each model)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODEL_NAMES)}")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    load = CpuLoad()
    import onnx
    import onnxruntime
    import onnxscript

    versions = {m.__name__: m.__version__ for m in (onnx, onnxscript, onnxruntime)}
    payload = {"machine": machine_info(torch.device("cpu")) | versions,
               "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
               "opset": args.opset, "classes": args.classes, "tol": args.tol, "agree": args.agree,
               "sizes": {str(k): v for k, v in SIZES.items()}, "batches": list(BATCHES), "models": []}
    for name in names:
        print(f"== {name}", flush=True)
        with tempfile.TemporaryDirectory(prefix="onnx_survey_") as tmp:
            try:
                row = survey_one(name, args, Path(tmp))
            except Exception as exc:  # recorded, and the survey goes on
                traceback.print_exc()
                row = {"model": name, "status": "error", "reason": first_line(exc)}
        payload["models"].append(row)
        print_table([row])
        payload["others_cpu_load"] = load.others()
        if args.out:
            write_json(args.out, payload)
    print()
    print_table(payload["models"])
    return 0 if all(r["status"] == "ok" for r in payload["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
