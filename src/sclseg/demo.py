"""Method comparisons over seeds: ``sclseg compare CONFIG`` and ``sclseg demo``.

Every compared entry (a method, or a labelled variant with its own overrides) trains the
config with each seed on the same data and budget into ``OUT/<label>_seed<k>/`` and is scored
on one split (teacher/EMA or student weights as ``eval.use_teacher`` says) into that folder's
``eval_<split>.json``. The summary is a function of those folders alone
(:func:`summarize_runs`), so seeds trained by separate processes into one ``OUT`` merge:
``summary.json`` (per-seed results, mean, std and 95% Student-t interval per entry, and the
paired difference of every two entries), ``summary.md`` and ``learning_curves.png`` (val mIoU
against step). The run that trains also draws ``comparison.png`` (image | each entry | ground
truth, as in the paper's Fig. 5). ``sclseg demo`` is the comparison of supervised, cl and
scl on the embedded digit scenes (``digits/default``).

Entries whose configs differ only in ``method.name`` take the same supervised steps before
``method.unlabeled_start`` (the trainer skips the unused unlabeled batches without loading
them), so their states there are equal bit for bit. Such a group trains that warm-up once per
seed: the first entry's run stops there, a copy of its folder (checkpoint, metrics,
TensorBoard scalars) seeds each other entry's folder, which resumes from it, and the first
run goes on.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import re
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sclseg.config import Config, ConfigError, config_to_dict, load_config, resolve_config_path
from sclseg.data import DataBundle, build_data, palette_array
from sclseg.engine.evaluation import evaluate_model
from sclseg.engine.inference import predict_probs
from sclseg.engine.trainer import Trainer
from sclseg.methods import METHODS, method_class
from sclseg.stats import describe, interval_verdict, paired_difference
from sclseg.viz import colorize, comparison_grid, learning_curves

__all__ = ["DEMO_METHODS", "Entry", "parse_variant", "run_comparison", "run_demo", "summarize_runs", "write_summary"]

#: The methods ``make demo`` compares (``sclseg compare`` takes any of :data:`sclseg.methods.METHODS`).
DEMO_METHODS = ("supervised", "cl", "scl")
DEMO_CONFIG = "digits/default"
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+]*")
_RUN_DIR = re.compile(r"(?P<label>.+)_seed(?P<seed>\d+)")


@dataclass(frozen=True)
class Entry:
    """One compared column: a label (``[A-Za-z0-9_.+]``, no ``-``) and the overrides it adds."""

    label: str
    overrides: tuple[str, ...]

    @classmethod
    def method(cls, name: str) -> Entry:
        return cls(name, (f"method.name={name}",))

    def warm_up_group(self) -> tuple[str, ...]:
        """Entries with equal groups differ only in ``method.name``."""
        return tuple(o for o in self.overrides if not o.startswith("method.name="))


def parse_variant(text: str) -> Entry:
    """``"LABEL: key=value key=value"`` -> :class:`Entry`
    (e.g. ``"scl_student: method.name=scl eval.use_teacher=false"``)."""
    label, sep, rest = text.partition(":")
    label, overrides = label.strip(), tuple(rest.split())
    if not sep or not _LABEL.fullmatch(label) or not overrides or any("=" not in o for o in overrides):
        raise ConfigError(f"--variant {text!r}: expected 'LABEL: key=value [key=value ...]' with a label of "
                          "letters, digits, '_', '.', '+' (no '-': it joins the labels of a pair)")
    return Entry(label, overrides)


def _order(labels: Sequence[str]) -> list[str]:
    """The methods in the registry's order, then the other labels alphabetically."""
    known = [m for m in METHODS if m in labels]
    return known + sorted(label for label in labels if label not in METHODS)


def _write_json(path: Path, data: dict) -> None:
    """Write atomically: a process summarizing the folder never reads half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _figure(models: dict, dataset, path: Path, count: int = 6) -> None:
    palette = palette_array(dataset.classes, dataset.ignore_index)
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    images = torch.stack([s["image"] for s in samples])
    preds = {m: predict_probs(model, images).argmax(1).numpy() for m, model in models.items()}
    rows = []
    for i, sample in enumerate(samples):
        rgb = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        rows.append([rgb] + [colorize(preds[m][i], palette) for m in models] + [colorize(sample["mask"].numpy(),
                                                                                         palette)])
    comparison_grid(rows, ["image", *models, "ground truth"], path)


@dataclass(frozen=True)
class _Run:
    """Where one compared run trains: its folder, the shared warm-up's snapshot folder, the warm-up
    step it resumes from (0: a fresh run) and the one it saves a snapshot at (0: none)."""

    folder: Path
    snapshot: Path
    resume_at: int
    snapshot_at: int


def _warm_up_groups(entries: Sequence[Entry], configs: dict, seed: int) -> list[list[Entry]]:
    """Entries that share their supervised warm-up: equal but for ``method.name``, and with the same
    EMA rule (the teacher's rule shapes the warm-up's teacher)."""
    groups: dict[tuple, list[Entry]] = {}
    for entry in entries:
        m = configs[entry.label][seed].method
        groups.setdefault((entry.warm_up_group(), method_class(m.name).uses_ema_warmup(m)), []).append(entry)
    return list(groups.values())


def _train_and_score(cfg: Config, data: DataBundle, run: _Run, split: str,
                     show_progress: bool = True) -> tuple[dict, torch.nn.Module]:
    """Train one compared run (from the shared warm-up's snapshot, or saving it) and score it on
    ``split``; its result record and the scored network (on the CPU, in eval mode)."""
    started = time.perf_counter()
    (run.folder / f"eval_{split}.json").unlink(missing_ok=True)  # an earlier comparison's score
    if run.resume_at:
        shutil.rmtree(run.folder, ignore_errors=True)  # an earlier comparison's run
        shutil.copytree(run.snapshot, run.folder)
        (run.folder / "config.yaml").unlink()  # the resumed run writes its own
    trainer = Trainer(cfg, run.folder, data=data, resume=bool(run.resume_at), show_progress=show_progress)
    if run.snapshot_at:
        trainer.run(until=run.snapshot_at)
        shutil.copytree(run.folder, run.snapshot)
    final = trainer.run()
    model = trainer.mean_teacher.teacher if cfg.eval.use_teacher else trainer.student
    result = evaluate_model(model, data.eval_splits[split], cfg.eval, device=trainer.device)
    result |= {
        "split": split, "method": cfg.method.name,
        "weights": "teacher (EMA)" if cfg.eval.use_teacher else "student",
        "iteration": final["iteration"], "shared_warm_up": run.resume_at,
        "labeled_images": len(data.labeled),
        "unlabeled_images": len(data.unlabeled) if data.unlabeled is not None else 0,
        "seconds": time.perf_counter() - started,
    }
    return result, model.cpu().eval()


@dataclass(frozen=True, eq=False)
class _Plan:
    """The runs of one seed of one warm-up group: entries, their configs, the shared warm-up."""

    seed: int
    entries: tuple[Entry, ...]
    configs: tuple[Config, ...]
    folders: tuple[Path, ...]
    snapshot: Path  # the run folder at the end of the shared warm-up
    warm_up: int  # steps shared by the group's runs (0: none)

    @classmethod
    def of(cls, group: list[Entry], seed: int, configs: dict, out: Path) -> _Plan:
        first = configs[group[0].label][seed]
        shared = len(group) > 1 and 0 < first.method.unlabeled_start < first.train.iterations
        return cls(seed, tuple(group), tuple(configs[e.label][seed] for e in group),
                   tuple(out / f"{e.label}_seed{seed}" for e in group), out / f".warmup_{group[0].label}_seed{seed}",
                   first.method.unlabeled_start if shared else 0)


def _run_plans_here(plans: list[_Plan], data_for: Callable[[Config], DataBundle], split: str) -> list:
    """Each plan's runs in this process, one after the other: the first run saves the warm-up's
    snapshot as it passes it, the others resume from it."""
    finished = []
    for plan in plans:
        shutil.rmtree(plan.snapshot, ignore_errors=True)
        for index, (entry, cfg, folder) in enumerate(zip(plan.entries, plan.configs, plan.folders)):
            run = _Run(folder, plan.snapshot, plan.warm_up if index else 0, 0 if index else plan.warm_up)
            finished.append((plan, entry, _train_and_score(cfg, data_for(cfg), run, split)))
        shutil.rmtree(plan.snapshot, ignore_errors=True)
    return finished


def _run_plans(plans: list[_Plan], data_for: Callable[[Config], DataBundle], split: str, jobs: int) -> list:
    """The same runs on ``jobs`` worker processes: every warm-up first, then every run resumes from
    its group's snapshot (an exact resume: the results are those of :func:`_run_plans_here`)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        warm_ups = {}
        for plan in plans:
            shutil.rmtree(plan.snapshot, ignore_errors=True)
            if plan.warm_up:
                cfg = plan.configs[0]
                warm_ups[plan] = pool.submit(_warm_up, cfg, data_for(cfg), plan.folders[0], plan.snapshot,
                                             plan.warm_up)
        pending = []
        for plan in plans:
            if plan in warm_ups:
                warm_ups[plan].result()
            for entry, cfg, folder in zip(plan.entries, plan.configs, plan.folders):
                run = _Run(folder, plan.snapshot, plan.warm_up, 0)
                pending.append((plan, entry, pool.submit(_train_and_score, cfg, data_for(cfg), run, split, False)))
        finished = [(plan, entry, future.result()) for plan, entry, future in pending]
    for plan in plans:
        shutil.rmtree(plan.snapshot, ignore_errors=True)
    return finished


def _warm_up(cfg: Config, data: DataBundle, folder: Path, snapshot: Path, steps: int) -> None:
    """Train the group's first run to the end of the shared warm-up and copy its folder to ``snapshot``."""
    Trainer(cfg, folder, data=data, show_progress=False).run(until=steps)
    shutil.copytree(folder, snapshot)


def run_comparison(
    config: str,
    out: Path,
    *,
    entries: Sequence[Entry] = tuple(Entry.method(m) for m in DEMO_METHODS),
    seeds: Sequence[int] = (0,),
    split: str = "test",
    overrides: Sequence[str] = (),
    jobs: int = 1,
) -> dict:
    """Train every entry for every seed, score each on ``split``, write and print the summary.

    ``config`` is a YAML file or a packaged config name; ``overrides`` apply to every run
    before each entry's own. ``jobs`` runs that many trainings at once in worker processes (each
    run's result does not depend on it). Returns the summary of every finished run in ``out``
    (those of earlier or concurrent processes included), as :func:`summarize_runs` does.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs: expected a number of processes >= 1, got {jobs}")
    labels = [e.label for e in entries]
    if not entries:
        raise ConfigError("compare needs at least one method (--methods) or --variant")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"compare needs distinct labels, got {labels}")
    out.mkdir(parents=True, exist_ok=True)
    config_path = resolve_config_path(config)
    configs = {e.label: {seed: load_config(config_path, [*overrides, *e.overrides,
                                                         f"train.seed={seed}"]) for seed in seeds}
               for e in entries}
    datasets: dict[str, DataBundle] = {}  # one build per distinct data section: equal scenes for every run

    def data_for(cfg: Config) -> DataBundle:
        key = json.dumps(config_to_dict(cfg)["data"], sort_keys=True)
        if key not in datasets:
            datasets[key] = build_data(cfg)
        bundle = datasets[key]
        if split not in bundle.eval_splits:
            raise ConfigError(f"--split {split}: not available; the data has {sorted(bundle.eval_splits)}")
        return bundle

    groups = _warm_up_groups(entries, configs, seeds[0])
    plans = [_Plan.of(group, seed, configs, out) for seed in seeds for group in groups]
    finished = _run_plans(plans, data_for, split, jobs) if jobs > 1 else _run_plans_here(plans, data_for, split)
    last_models, last_test = {}, None
    for plan, entry, (result, model) in finished:
        result |= {"label": entry.label, "seed": plan.seed, "config": str(config),
                   "overrides": [*overrides, *entry.overrides]}
        _write_json(out / f"{entry.label}_seed{plan.seed}" / f"eval_{split}.json", result)
        last_models[entry.label] = model
        last_test = data_for(plan.configs[0]).eval_splits[split]
    summary = summarize_runs(out, split=split)
    _figure(last_models, last_test, out / "comparison.png")
    paths = [*write_summary(out, summary), out / "comparison.png"]
    print(f"\n{config}: {summary['labeled_images']} labeled + {summary['unlabeled_images']} unlabeled images, "
          f"{summary['iterations']} iterations, seeds {summary['seeds']}, {summary['seconds']:.0f} s of training and "
          "scoring")
    print(markdown_summary(summary))
    print("\n" + "\n".join(f"wrote {p}" for p in paths))
    return summary


def run_demo(out: Path, *, seeds: Sequence[int] = (0,), overrides: Sequence[str] = (),
             methods: Sequence[str] = DEMO_METHODS, jobs: int = 1) -> dict:
    """supervised vs cl vs scl on the embedded digit scenes, scored on the test scenes."""
    return run_comparison(DEMO_CONFIG, out, entries=[Entry.method(m) for m in methods], seeds=seeds,
                          overrides=overrides, jobs=jobs)


def _eval_curve(metrics: Path) -> tuple[dict[int, float], set[str]]:
    """``{step: mIoU}`` of the eval records of a run's ``metrics.jsonl`` (the last one per step), and their splits."""
    curve, splits = {}, set()
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a hard kill
            continue
        if record.get("kind") == "eval" and record.get("miou") is not None:
            curve[int(record["iteration"])] = float(record["miou"])
            splits.add(str(record.get("split")))
    return curve, splits


def _common(values: dict[str, object]) -> object:
    """The one value every run shares, else the ``{"<label>_seed<k>": value}`` mapping."""
    distinct = {json.dumps(v, sort_keys=True) for v in values.values()}
    return next(iter(values.values())) if len(distinct) == 1 else values


def _block(per_label: dict[str, dict[str, float]], order: Sequence[str]) -> dict:
    """Per-entry statistics and the paired difference (later minus earlier) of every two entries."""
    runs = {}
    for label in order:
        stat = describe(list(per_label[label].values()))
        runs[label] = {"miou": stat.pop("mean"), **stat, "per_seed": per_label[label]}
    paired = {}
    for earlier, later in itertools.combinations(order, 2):
        if set(per_label[earlier]) & set(per_label[later]):
            stat = paired_difference(per_label[later], per_label[earlier])
            paired[f"{later}-{earlier}"] = stat | {"verdict": interval_verdict(stat)}
    return {"runs": runs, "paired": paired}


def summarize_runs(out: Path, *, split: Optional[str] = None) -> dict:
    """The comparison summary from the ``<label>_seed<k>/`` folders in ``out`` alone.

    A folder counts once it holds ``eval_<split>.json``; ``split`` may be left out when the
    folders hold one split only. ``runs[label]`` has ``miou`` (mean), ``std``, ``ci95``, ``n``
    and ``per_seed``; ``paired["<later>-<earlier>"]`` the mean, std, ``ci95``, ``per_seed`` and
    ``contains_zero`` of the per-seed differences over the seeds both entries hold (entries in
    supervised, cl, scl order, then alphabetical). ``boundary`` holds the same for
    ``boundary_miou`` when every run reports it; ``learning_curves`` the eval-split mIoU
    against step per entry (mean, min, max over the seeds that evaluated at that step).
    """
    listed = Path(out).iterdir() if Path(out).is_dir() else []
    folders = sorted(p for p in listed if p.is_dir() and not p.name.startswith(".") and _RUN_DIR.fullmatch(p.name))
    if split is None:
        splits = sorted({f.name[5:-5] for p in folders for f in p.glob("eval_*.json")})
        if len(splits) != 1:
            raise ConfigError(f"{out}: " + (f"runs scored on several splits {splits}; name one with --split"
                                            if splits else "no <label>_seed<k>/eval_<split>.json in it"))
        split = splits[0]
    results: dict[str, dict[int, dict]] = {}
    for folder in folders:
        path = folder / f"eval_{split}.json"
        if path.is_file():
            match = _RUN_DIR.fullmatch(folder.name)
            results.setdefault(match["label"], {})[int(match["seed"])] = json.loads(path.read_text()) | {"dir": folder}
    if not results:
        raise ConfigError(f"{out}: no <label>_seed<k>/eval_{split}.json in it")
    order = _order(list(results))
    seeds = sorted({seed for by_seed in results.values() for seed in by_seed})
    every = {f"{label}_seed{seed}": r for label in order for seed, r in sorted(results[label].items())}

    def per_seed(key: str) -> dict[str, dict[str, float]]:
        return {label: {str(seed): results[label][seed][key] for seed in sorted(results[label])} for label in order}

    summary = {"split": split, "seeds": seeds, "methods": order,
               "interval": "95% Student t over seeds: mean ± t(0.975, n - 1) * std / sqrt(n), std with n - 1",
               **_block(per_seed("miou"), order)}
    if all("boundary_miou" in r for r in every.values()):
        summary["boundary"] = {"width": _common({k: r["boundary_width"] for k, r in every.items()}),
                               **_block(per_seed("boundary_miou"), order)}
    for key in ("images", "eval_mode", "weights", "iteration", "labeled_images", "unlabeled_images"):
        summary["iterations" if key == "iteration" else key] = _common({k: r.get(key) for k, r in every.items()})
    summary["shared_warm_up"] = max(r.get("shared_warm_up", 0) for r in every.values())
    summary["seconds"] = sum(r.get("seconds", 0.0) for r in every.values())
    methods, curve_splits = {}, set()
    for label in order:
        curves = []
        for seed in sorted(results[label]):
            curve, splits = _eval_curve(results[label][seed]["dir"] / "metrics.jsonl")
            curves.append(curve)
            curve_splits |= splits
        steps = sorted(set().union(*curves))
        values = [[c[s] for c in curves if s in c] for s in steps]
        methods[label] = {"step": steps, "mean": [statistics.fmean(v) for v in values],
                          "min": [min(v) for v in values], "max": [max(v) for v in values],
                          "n": [len(v) for v in values]}
    summary["learning_curves"] = {"split": "/".join(sorted(curve_splits)), "methods": methods}
    return summary


def _ci(ci: Optional[Sequence[float]], sign: str = "") -> str:
    return "-" if ci is None else f"[{ci[0]:{sign}.2f}, {ci[1]:{sign}.2f}]"


def _tables(block: dict, seeds: Sequence[int], what: str) -> list[str]:
    heads = " | ".join(f"seed {s}" for s in seeds)
    cell = lambda per, s: f"{per[str(s)]:.2f}" if str(s) in per else "-"  # noqa: E731
    lines = [f"| method | {heads} | {what}: mean ± std | 95% CI |", "| --- |" + " --- |" * (len(seeds) + 2)]
    for label, r in block["runs"].items():
        std = "" if r["std"] is None else f" ± {r['std']:.2f}"
        lines.append(f"| {label} | " + " | ".join(cell(r["per_seed"], s) for s in seeds)
                     + f" | **{r['miou']:.2f}**{std} | {_ci(r['ci95'])} |")
    lines += ["", f"| paired difference | {heads} | mean | 95% CI | reading |", "| --- |" + " --- |" * (len(seeds) + 3)]
    for pair, d in block["paired"].items():
        lines.append(f"| {pair.replace('-', ' − ')} | " + " | ".join(
            f"{d['per_seed'][str(s)]:+.2f}" if str(s) in d["per_seed"] else "-" for s in seeds)
            + f" | **{d['mean']:+.2f}** | {_ci(d['ci95'], '+')} | {d['verdict']} |")
    return lines


def markdown_summary(summary: dict) -> str:
    """``summary.md``: per-seed results and paired differences (mIoU, then the boundary band)."""
    seeds, split = summary["seeds"], summary["split"]
    say = lambda key: "mixed (see summary.json)" if isinstance(summary[key], dict) else summary[key]  # noqa: E731
    lines = [f"{split} mIoU, {say('weights')} weights, {say('eval_mode')} evaluation, "
             f"{say('images')} images, seeds {seeds}.", "",
             *_tables(summary, seeds, f"{split} mIoU")]
    if "boundary" in summary:
        lines += ["", f"Boundary band: mIoU of the pixels within {summary['boundary']['width']} pixels of a label "
                      "edge.", "",
                  *_tables(summary["boundary"], seeds, f"{split} boundary mIoU")]
    lines += ["", "95% CI: Student t over seeds, mean ± t(0.975, n − 1) · std / √n; a paired difference is "
              "later − earlier per seed, and an interval that contains 0 means the difference is inside "
              "the seed-to-seed noise."]
    return "\n".join(lines)


def write_summary(out: Path, summary: dict) -> list[Path]:
    """Write ``summary.json``, ``summary.md`` and ``learning_curves.png`` into ``out``."""
    _write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown_summary(summary) + "\n")
    curves = summary["learning_curves"]
    learning_curves(curves["methods"], out / "learning_curves.png", ylabel=f"{curves['split']} mIoU (%)",
                    title=f"{curves['split']} mIoU during training: mean and min-max over seeds")
    return [out / "summary.json", out / "summary.md", out / "learning_curves.png"]
