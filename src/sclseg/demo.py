"""``sclseg demo``: supervised vs cl vs scl on the embedded digit scenes.

Each method trains the packaged ``digits/default`` config with the same seed, data and
budget; each is then scored on the held-out test scenes (teacher/EMA weights, whole-image
inference). Writes ``summary.json``, ``summary.md`` and ``comparison.png`` (image |
supervised | cl | scl | ground truth, as in the paper's Fig. 5).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sclseg.cli import resolve_config_path
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
    runs: dict[str, dict] = {}
    last_models = {}
    for method in methods:
        scores = []
        for seed in seeds:
            cfg = load_config(config_path, [*overrides, f"method.name={method}", f"train.seed={seed}"])
            trainer = Trainer(cfg, out / f"{method}_seed{seed}", data=data)
            trainer.run()
            model = trainer.mean_teacher.teacher if cfg.eval.use_teacher else trainer.student
            result = evaluate_model(model, test, cfg.eval, device=trainer.device)
            (trainer.out_dir / "eval_test.json").write_text(json.dumps(result, indent=2))
            scores.append(result["miou"])
            last_models[method] = model.cpu().eval()
        runs[method] = {
            "miou": statistics.fmean(scores),
            "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "per_seed": dict(zip(map(str, seeds), scores)),
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
