"""``sclseg demo``: supervised vs cl vs scl on the embedded digit scenes.

Each method trains the packaged ``digits/default`` config with the same seed, data and
budget; each is then scored on the held-out test scenes (teacher/EMA weights, whole-image
inference). Writes ``summary.json``, ``summary.md`` and ``comparison.png`` (image |
supervised | cl | scl | ground truth, as in the paper's Fig. 5).

Before ``method.unlabeled_start`` every method takes the same supervised steps (the trainer
skips the unused unlabeled batches without loading them), so their states there are equal bit
for bit. The demo trains that warm-up once per seed: the first method's run stops there, a copy of its
folder (checkpoint, metrics, TensorBoard scalars) seeds each other method's folder, which
resumes from it, and the first run goes on.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sclseg.config import resolve_config_path
from sclseg.config import load_config
from sclseg.data import build_data, palette_array
from sclseg.engine.evaluate import evaluate_model
from sclseg.engine.inference import predict_probs
from sclseg.engine.trainer import Trainer
from sclseg.viz import colorize, comparison_grid

__all__ = ["run_demo"]

CONFIG = "digits/default"


def _figure(models: dict, dataset, path: Path, count: int = 6) -> None:
    palette = palette_array(dataset.classes, dataset.ignore_index)
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    images = torch.stack([s["image"] for s in samples])
    preds = {m: predict_probs(model, images).argmax(1).numpy() for m, model in models.items()}
    rows = []
    for i, sample in enumerate(samples):
        rgb = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        rows.append([rgb] + [colorize(preds[m][i], palette) for m in models] + [colorize(sample["mask"].numpy(), palette)])
    comparison_grid(rows, ["image", *models, "ground truth"], path)


def run_demo(out: Path, *, seeds: Sequence[int] = (0,), overrides: Sequence[str] = (), methods: Sequence[str] = ("supervised", "cl", "scl")) -> dict:
    """Train every method for every seed, score on the test scenes, write the summary."""
    out.mkdir(parents=True, exist_ok=True)
    config_path = resolve_config_path(CONFIG)
    base = load_config(config_path, list(overrides))
    started = time.perf_counter()
    data = build_data(base)  # the same scenes and labeled subset for every run
    test = data.eval_splits["test"]
    warm_up = base.method.unlabeled_start if len(methods) > 1 and base.method.unlabeled_start < base.train.iterations else 0
    scores: dict[str, list[float]] = {method: [] for method in methods}
    last_models = {}
    for seed in seeds:
        snapshot = out / f"warmup_seed{seed}"  # the run folder at the end of the shared warm-up
        shutil.rmtree(snapshot, ignore_errors=True)
        for index, method in enumerate(methods):
            cfg = load_config(config_path, [*overrides, f"method.name={method}", f"train.seed={seed}"])
            run_dir = out / f"{method}_seed{seed}"
            from_warm_up = index > 0 and warm_up > 0
            if from_warm_up:
                shutil.rmtree(run_dir, ignore_errors=True)  # an earlier demo's run
                shutil.copytree(snapshot, run_dir)
                (run_dir / "config.yaml").unlink()  # the resumed run writes its own
            trainer = Trainer(cfg, run_dir, data=data, resume=from_warm_up)
            if index == 0 and warm_up > 0:
                trainer.run(until=warm_up)
                shutil.copytree(run_dir, snapshot)
            trainer.run()
            model = trainer.mean_teacher.teacher if cfg.eval.use_teacher else trainer.student
            result = evaluate_model(model, test, cfg.eval, device=trainer.device)
            (trainer.out_dir / "eval_test.json").write_text(json.dumps(result, indent=2))
            scores[method].append(result["miou"])
            last_models[method] = model.cpu().eval()
        shutil.rmtree(snapshot, ignore_errors=True)
    runs = {
        method: {
            "miou": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": dict(zip(map(str, seeds), values)),
        }
        for method, values in scores.items()
    }
    summary = {
        "runs": runs,
        "split": "test",
        "test_images": len(test),
        "eval_mode": result["eval_mode"],
        "weights": "teacher (EMA)" if base.eval.use_teacher else "student",
        "seeds": list(seeds),
        "labeled_scenes": len(data.labeled),
        "unlabeled_scenes": len(data.unlabeled) if data.unlabeled is not None else 0,
        "iterations": base.train.iterations,
        "shared_warm_up": warm_up,
        "seconds": time.perf_counter() - started,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = ["| method | test mIoU (mean ± std over seeds) |", "| --- | --- |"]
    lines += [f"| {m} | {r['miou']:.2f} ± {r['std']:.2f} |" for m, r in runs.items()]
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    _figure(last_models, test, out / "comparison.png")
    print(f"\n{len(data.labeled)} labeled + {summary['unlabeled_scenes']} unlabeled digit scenes, "
          f"{base.train.iterations} iterations, seeds {list(seeds)}, {summary['seconds']:.0f} s")
    print(table)
    print(f"\nsummary: {out / 'summary.json'}\nfigure:  {out / 'comparison.png'}")
    return summary
