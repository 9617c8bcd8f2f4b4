"""The ``sclseg`` command: train, evaluate, check, predict, export, demo, compare, config.

Every command prints a human-readable result and writes a JSON file beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sclseg.config import Config, ConfigError, load_config, resolve_config_path
from sclseg.device import resolve_device

__all__ = ["main"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def _load(name: str, overrides: Sequence[str]) -> Config:
    return load_config(resolve_config_path(name), list(overrides))


def _resume_argument(args: argparse.Namespace) -> None:
    """``--resume`` takes an optional path; a ``key=value`` right after it is an override, not a path."""
    value = args.resume
    if value not in (None, "latest", "auto") and "=" in value and not Path(value).exists():
        args.overrides = [value, *args.overrides]
        args.resume = "latest"


def _dry_run(cfg: Config, args: argparse.Namespace):
    """Shrink the run to one step that evaluates one image; check every data file unless ``--quick``.

    Returns the data, built once for the check and the trainer. When the builder stops at a bad
    layout, the check (which scans the layout itself) lists every problem instead of the first.
    """
    from sclseg.data import build_data
    from sclseg.data.check import check_data

    cfg.train.iterations = 1
    cfg.train.eval_interval = cfg.train.checkpoint_interval = cfg.train.log_interval = 1
    try:
        data = build_data(cfg)
    except (ValueError, FileNotFoundError):
        if not args.quick:
            check_data(cfg).raise_for_problems()
        raise
    if not args.quick:
        report = check_data(cfg, bundle=data)
        print(f"data check: {report.summary()}", file=sys.stderr)
        for problem in report.warnings:
            print(f"warning: {problem.line()}", file=sys.stderr)
        report.raise_for_problems()
    return data


def _cmd_train(args: argparse.Namespace) -> int:
    from sclseg.engine import distributed as dist
    from sclseg.engine.errors import RunFolderInUse
    from sclseg.engine.trainer import Trainer

    _resume_argument(args)
    cfg = _load(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    data = None
    if args.dry_run:
        data = _dry_run(cfg, args)
        out = out / "dry_run"
    resume = {"latest": True, "auto": "auto"}.get(args.resume, args.resume)
    args.run_dir = out  # for the messages of a stopped run
    try:
        trainer = Trainer(cfg, out, resume=resume, data=data, existing="replace" if args.dry_run else "error",
                          eval_images=1 if args.dry_run else None)
        final = trainer.run()
    except RunFolderInUse as exc:
        raise ConfigError(f"{exc}; continue it with --resume, or choose another --out (or delete the folder) "
                          "to start afresh") from None
    finally:
        dist.cleanup()
    if dist.is_main():
        print(json.dumps({"out": str(out), **final}, indent=2, default=str))
    return 0


def _checkpoint_model(path: str, use_teacher: bool, cfg: Optional[Config] = None, num_classes: Optional[int] = None):
    """``(model, config, checkpoint dict)`` of an sclseg file, or of a published whole-network file
    (NVIDIA's, UniMatch's) built as ``cfg.model`` with ``num_classes`` classes when ``cfg`` is given;
    ``use_teacher=False`` takes the trained network of a file that holds an EMA copy beside it."""
    from sclseg.engine.checkpoint import CHECKPOINT_FORMAT, WEIGHTS_FORMAT, load_checkpoint
    from sclseg.export import build_model_from_checkpoint
    from sclseg.models import create_model
    from sclseg.models.registry import layout_for
    from sclseg.models.weights import load_weights, read_file

    if Path(path).suffix == ".onnx":
        from sclseg.export import load_onnx

        return load_onnx(path)
    if cfg is None:
        ckpt = load_checkpoint(Path(path))
    else:
        contents = read_file(path, what="--checkpoint")
        if not (isinstance(contents, dict) and contents.get("format") in (CHECKPOINT_FORMAT, WEIGHTS_FORMAT)):
            model = create_model(cfg.model, num_classes, load_pretrained=False)
            layout = layout_for(cfg.model.name, cfg.model.pretrained_weights if use_teacher else "model")
            load_weights(model, path, layout, scope="network", contents=contents, what="--checkpoint")
            return model, cfg, {"num_classes": num_classes, "iteration": None, "published": True}
        ckpt = contents
    model, saved_cfg = build_model_from_checkpoint(ckpt, use_teacher=use_teacher, source=path)
    return model, saved_cfg, ckpt


def _cmd_export(args: argparse.Namespace) -> int:
    from sclseg.export import export_weights

    if Path(args.out).suffix == ".onnx":
        from sclseg.export import export_onnx

        info = export_onnx(Path(args.checkpoint), Path(args.out), use_teacher=not args.student, opset=args.opset)
        Path(f"{args.out}.json").write_text(json.dumps(info, indent=2))
        print(f"wrote the {info['weights']} network of step {info['iteration']} as ONNX (opset {info['opset']}, "
              f"{info['bytes'] / 1e6:.1f} MB) to {args.out}")
        return 0

    info = export_weights(Path(args.checkpoint), Path(args.out), use_teacher=not args.student,
                          dtype=torch.float16 if args.half else None)
    Path(f"{args.out}.json").write_text(json.dumps(info, indent=2))  # what was exported, for scripts
    print(f"wrote the {info['weights']} weights of step {info['iteration']} ({info['bytes'] / 1e6:.1f} MB) to "
          f"{args.out}")
    return 0


def _check_same_model(path: str, cfg: Config, saved: Config, ckpt: dict, data) -> None:
    """Refuse to score a checkpoint under a config that describes another network or other classes."""
    if ckpt["num_classes"] != data.num_classes:
        raise ValueError(f"{path}: {ckpt['num_classes']} classes, but the config's data has {data.num_classes}")
    if ckpt.get("published"):
        return
    differ = [k for k in ("name", "width", "output_stride")
              if getattr(cfg.model, k) != getattr(saved.model, k)]
    if differ:
        held = ", ".join(f"{k}={getattr(saved.model, k)!r}" for k in differ)
        asked = ", ".join(f"{k}={getattr(cfg.model, k)!r}" for k in differ)
        raise ValueError(f"{path}: the checkpoint holds model {held}, the config asks for {asked}; evaluate with the "
                         "run's own config.yaml, or set model.* to the checkpoint's")
    names = [c.name for c in data.classes]
    if list(ckpt.get("class_names") or names) != names:
        raise ValueError(f"{path}: the checkpoint's classes are {', '.join(ckpt['class_names'])}, the config's data "
                         f"names {', '.join(names)}; expected the same classes in the same order")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from sclseg.data import build_data

    if (args.checkpoint is None) == (args.predictions is None):
        raise ConfigError("evaluate needs exactly one of --checkpoint CKPT (score a model) or --predictions DIR (score "
                          "PNGs)")
    cfg = _load(args.config, args.overrides)
    if args.split:
        cfg.eval.split = args.split
    data = build_data(cfg, for_training=False)
    if cfg.eval.split not in data.eval_splits:
        raise ConfigError(f"split '{cfg.eval.split}' not available; have {sorted(data.eval_splits)}")
    dataset = data.eval_splits[cfg.eval.split]
    if args.predictions is not None:
        from sclseg.engine.evaluation import score_prediction_dir

        result = score_prediction_dir(dataset, Path(args.predictions))
        result |= {"split": cfg.eval.split, "predictions": str(args.predictions)}
        default_out = Path(args.predictions) / f"eval_{cfg.eval.split}.json"
    else:
        from sclseg.engine.evaluation import evaluate_model

        device = resolve_device(cfg.train.device, "train.device")
        model, model_cfg, ckpt = _checkpoint_model(args.checkpoint, not args.student, cfg, data.num_classes)
        _check_same_model(args.checkpoint, cfg, model_cfg, ckpt, data)
        weights = "student" if args.student else "teacher"
        if ckpt.get("published"):
            weights = "model" if args.student else cfg.model.pretrained_weights
        result = evaluate_model(model.to(device), dataset, cfg.eval, device=device)
        result |= {"split": cfg.eval.split, "checkpoint": str(args.checkpoint), "model": model_cfg.model.name,
                   "weights": weights, "iteration": ckpt["iteration"]}
        default_out = Path(args.checkpoint).with_name(f"eval_{cfg.eval.split}{'_student' if args.student else ''}.json")
    out = Path(args.out) if args.out else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{cfg.eval.split}: mIoU {result['miou']:.2f} ({result['eval_mode']}, {result['images']} images) -> {out}")
    if result.get("boundary_miou") is not None:
        print(f"  boundary mIoU {result['boundary_miou']:.2f} (pixels within {result['boundary_width']} of a label "
              "edge)")
    for name, iou in result["per_class_iou"].items():
        print(f"  {name:>16s} {'-' if iou is None else f'{iou:6.2f}'}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from sclseg.data.check import check_data

    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: expected a positive number of threads")
    cfg = _load(args.config, args.overrides)
    report = check_data(cfg, workers=args.workers, cache=not args.no_cache)
    out = Path(args.report) if args.report else Path("runs") / Path(args.config).stem / "check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, **report.to_dict()}, indent=2))
    print(f"{report.summary()} -> {out}")
    for problem in report.warnings:
        print(f"warning: {problem.line()}")
    for problem in report.problems:
        print(f"problem: {problem.line()}", file=sys.stderr)
    return 0 if report.ok else 2


_OUTPUT_SUFFIXES = ("_labels.png", "_overlay.png")


def _is_own_output(file: Path, out: Optional[Path]) -> bool:
    """Whether ``file`` is something predict writes under ``out`` (a label map, an overlay, a labelId PNG)."""
    if out is None or not file.is_relative_to(out):
        return False
    return file.name.endswith(_OUTPUT_SUFFIXES) or (out / "cityscapes_label_ids") in file.parents


def _input_files(inputs: Sequence[str], exclude: Optional[Path] = None) -> list[tuple[Path, Path]]:
    """The images to label, each with its output name under --out (no suffix added yet).

    A file found in a folder keeps its path relative to that folder (``cam2/0001``), a file
    given directly its stem; files whose names would clash keep their extension
    (``0001_jpg``, ``0001_png``). What predict writes under ``exclude`` (the output folder, which
    may be the input folder) is never read back as an input. Two inputs that still share a name
    are an error naming both.
    """
    out = exclude.resolve() if exclude is not None else None
    entries: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
            pairs = [(p, p.relative_to(path)) for p in found]
        elif path.is_file():
            pairs = [(path, Path(path.name))]
        else:
            raise FileNotFoundError(f"input not found: {path}")
        for file, rel in pairs:
            resolved = file.resolve()
            if resolved not in seen and not _is_own_output(resolved, out):
                seen.add(resolved)
                entries.append((file, rel))
    if not entries:
        raise FileNotFoundError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {', '.join(inputs)}")
    stems = Counter(rel.with_suffix("") for _, rel in entries)
    named = [(file,
              rel.with_suffix("") if stems[rel.with_suffix("")] == 1 else rel.with_name(f"{rel.stem}_{rel.suffix[1:]}"))
             for file, rel in entries]
    owner: dict[Path, Path] = {}
    for file, name in named:
        if name in owner:
            raise ValueError(f"inputs {owner[name]} and {file} would both write {name}_labels.png under --out; "
                             "rename one, or label them in separate runs with different --out folders")
        owner[name] = file
    return named


def _predict_options(args: argparse.Namespace) -> Path:
    """Check the flags of predict before any model is loaded; return the --out folder."""
    if args.scales is not None and not all(s > 0 and np.isfinite(s) for s in args.scales):
        raise ConfigError(f"--scales {' '.join(f'{s:g}' for s in args.scales)}: expected positive numbers, e.g. 0.5 "
                          "1.0 2.0")
    if args.tile is not None and min(args.tile) < 1:
        raise ConfigError(f"--tile {args.tile[0]} {args.tile[1]}: expected two positive integers H W, e.g. --tile 512 "
                          "1024")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; expected a folder for the label maps (created when missing)")
    return out


class _Predictions:
    """What predict has written so far, kept true in ``OUT/predictions.json`` (rewritten atomically)."""

    def __init__(self, out: Path, header: dict) -> None:
        self.out, self.header = out, header
        self.files: list[dict] = []
        self.unreadable: list[dict] = []

    def write(self, *, interrupted: bool = False) -> None:
        record = {**self.header, "files": self.files, "unreadable": self.unreadable, "interrupted": interrupted}
        tmp = self.out / f".predictions.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, self.out / "predictions.json")


def _write_prediction(out: Path, name: Path, rgb: np.ndarray, labels: np.ndarray, palette: np.ndarray,
                      cityscapes_ids: bool) -> dict:
    """Write one image's label map and overlay (and labelId PNG); returns its entry of predictions.json.

    When interrupted, the files of this image already written are removed, so that every file
    on disk is listed.
    """
    from sclseg.viz import colorize, overlay, save_png

    written: list[Path] = []
    try:
        written.append(save_png(labels, out / f"{name}_labels.png", palette=palette))
        side_by_side = np.concatenate([overlay(rgb, labels, palette), colorize(labels, palette)], axis=1)
        written.append(save_png(side_by_side, out / f"{name}_overlay.png"))
        entry = {"labels": str(written[0]), "overlay": str(written[1])}
        if cityscapes_ids:
            from sclseg.viz import write_cityscapes_prediction

            submission = write_cityscapes_prediction(labels, name.name, out / "cityscapes_label_ids" / name.parent,
                                                     size=None)
            written.append(submission["label_ids"])
            entry["cityscapes_label_ids"] = str(submission["label_ids"])
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return entry


def _cmd_predict(args: argparse.Namespace) -> int:
    from sclseg.data import ClassInfo, palette_array
    from sclseg.data.folder import read_image
    from sclseg.engine.inference import predict_probs

    out = _predict_options(args)
    device = resolve_device(args.device, "--device")
    inputs = _input_files(args.inputs, exclude=out)
    model, cfg, ckpt = _checkpoint_model(args.checkpoint, use_teacher=not args.student)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror
        raise ConfigError(f"--out {out}: cannot create the folder ({reason}); expected a writable folder") from None
    model.to(device).eval()
    palette = palette_array([ClassInfo(n, tuple(c)) for n, c in zip(ckpt["class_names"], ckpt["class_colors"])])
    scales = args.scales if args.scales else cfg.eval.scales
    tile = args.tile if args.tile else cfg.eval.tile
    done = _Predictions(out, {"checkpoint": str(args.checkpoint), "class_names": ckpt["class_names"]})
    try:
        for path, name in inputs:
            try:
                image = read_image(path)
            except (ValueError, FileNotFoundError) as exc:
                done.unreadable.append({"input": str(path), "error": str(exc)})
                print(f"skipped: {exc}", file=sys.stderr)
                continue
            rgb = image.permute(1, 2, 0).numpy()
            probs = predict_probs(model, image[None].float().div(255).to(device), scales=scales,
                                  flip=args.flip or cfg.eval.flip, tile=tile, overlap=cfg.eval.tile_overlap,
                                  protocol=cfg.eval.protocol)
            labels = probs.argmax(1)[0].cpu().numpy().astype(np.uint8)
            entry = _write_prediction(out, name, rgb, labels, palette, args.cityscapes_ids)
            done.files.append({"input": str(path)} | entry)
    except KeyboardInterrupt:
        done.write(interrupted=True)
        print(f"sclseg predict: interrupted; the {len(done.files)} label maps and overlays written before it are "
              f"whole and listed in {out / 'predictions.json'}", file=sys.stderr)
        return 130
    done.write()
    print(f"wrote {len(done.files)} label maps and overlays to {out}")
    if done.unreadable:
        print(f"sclseg predict: error: {len(done.unreadable)} of {len(inputs)} images could not be read (listed "
              f"under 'unreadable' in {out / 'predictions.json'})", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _comparison_args(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """``--methods`` and ``--seeds``, with any ``key=value`` overrides they swallowed moved to ``args.overrides``."""
    from sclseg.methods import METHODS

    taken = [item for item in [*args.methods, *args.seeds] if "=" in item]
    args.overrides = [*taken, *args.overrides]
    methods = [m for m in args.methods if "=" not in m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"--methods: unknown {unknown}; choose from {list(METHODS)} (or add a --variant)")
    try:
        seeds = [int(s) for s in args.seeds if "=" not in s]
    except ValueError as exc:
        raise ConfigError(f"--seeds: expected integers, got {args.seeds}") from exc
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    return methods, seeds


def _cmd_demo(args: argparse.Namespace) -> int:
    from sclseg.demo import run_demo

    methods, seeds = _comparison_args(args)
    run_demo(Path(args.out), seeds=seeds, overrides=args.overrides, methods=methods, jobs=args.jobs)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from sclseg.demo import Entry, markdown_summary, parse_variant, run_comparison, summarize_runs, write_summary

    if args.summarize is not None:
        if args.config is not None or args.overrides or args.variant:
            raise ConfigError("compare --summarize DIR takes no CONFIG, --variant or overrides: it reads the run "
                              "folders")
        out = Path(args.summarize)
        if not out.is_dir():
            raise FileNotFoundError(f"--summarize: no folder {out}")
        summary = summarize_runs(out, split=args.split)
        paths = write_summary(out, summary)
        print(markdown_summary(summary) + "\n\n" + "\n".join(f"wrote {p}" for p in paths))
        return 0
    if args.config is None:
        raise ConfigError("compare needs CONFIG (a YAML file or packaged name), or --summarize DIR")
    methods, seeds = _comparison_args(args)
    entries = [Entry.method(m) for m in methods] + [parse_variant(v) for v in args.variant]
    out = Path(args.out) if args.out else Path("runs") / "compare" / Path(args.config).stem
    run_comparison(args.config, out, entries=entries, seeds=seeds, split=args.split or "test",
                   overrides=args.overrides, jobs=args.jobs)
    return 0


_DESCRIPTION = ("Semi-supervised semantic segmentation with the Structured Consistency Loss: train, evaluate, "
                "check, predict, export, demo, compare, config. Every command prints its result and writes "
                "a JSON file beside it.")

_OVERRIDES = """config overrides:
  Any config key can be set after the command as section.key=value (the value is YAML), e.g.
    train.iterations=200 method.name=cl
    data.crop_size=[256,256] optim.lr=0.0001
  Every key, its default and its meaning: sclseg config show CONFIG (and docs/config.md)."""


def _command(sub, name: str, help_text: str, *, overrides: bool = True, description: Optional[str] = None
             ) -> argparse.ArgumentParser:
    """A subcommand; one that takes config overrides explains them in its --help (kept as laid out)."""
    return sub.add_parser(name, help=help_text, epilog=_OVERRIDES if overrides else None,
                          description=textwrap.fill(description or help_text, 100),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _cmd_config(args: argparse.Namespace) -> int:
    from sclseg.config_reference import show

    print(show(_load(args.config, args.overrides)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from sclseg import __version__

    parser = argparse.ArgumentParser(prog="sclseg", description=textwrap.fill(_DESCRIPTION, 100), epilog=_OVERRIDES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sclseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "train", "train a model from a YAML config")
    p.add_argument("config", help="YAML file, or a packaged config name such as digits/default")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in --out, or from the given file; "
                        "'--resume auto' starts afresh when --out holds no checkpoint (for requeued jobs)")
    p.add_argument("--dry-run", action="store_true",
                   help="check every data file, build everything, run one step, evaluate one image, exit")
    p.add_argument("--quick", action="store_true", help="with --dry-run: skip the full data check")
    p.set_defaults(func=_cmd_train)

    p = _command(sub, "evaluate", "score a checkpoint on a split of the config's data")
    p.add_argument("config")
    p.add_argument("--checkpoint", help="score this checkpoint's model")
    p.add_argument("--predictions", help="score the prediction PNGs in this folder instead of a model")
    p.add_argument("--split", help="split to score (default: eval.split)")
    p.add_argument("--student", action="store_true", help="use the student instead of the EMA teacher")
    p.add_argument("--out", help="JSON output (default: eval_<split>.json beside the checkpoint)")
    p.set_defaults(func=_cmd_evaluate)

    p = _command(sub, "check", "read every image and mask of a config's data; report every bad file",
                 description="Decode every image and mask of every split CONFIG uses (labeled, unlabeled, val, "
                             "test) in parallel and report every problem at once: unreadable or truncated files, "
                             "RGB masks, lossy (JPEG) masks, mask/image size mismatches (naming an EXIF orientation "
                             "tag that turns the image), values outside the classes, missing masks, classes no "
                             "labeled mask contains. Exit 0 when clean, 2 when problems were found. Results are "
                             "cached per file (path, size, mtime) in <data.root>/.sclseg_cache/data_check.json "
                             "(data.class_uniform.cache_dir when set).")
    p.add_argument("config", help="YAML file, or a packaged config name")
    p.add_argument("--workers", type=int, help="threads decoding files (default: the CPU count, at most 16)")
    p.add_argument("--report", help="JSON report (default: runs/<config name>/check.json)")
    p.add_argument("--no-cache", action="store_true", help="re-read every file; neither read nor update the cache")
    p.set_defaults(func=_cmd_check)

    _add_inference_commands(sub)
    _add_comparison_commands(sub)

    p = _command(sub, "config", "show a resolved config: every key's value, default and meaning")
    p.add_argument("action", choices=["show"], help="show: print every key of CONFIG (with the overrides)")
    p.add_argument("config", help="YAML file, or a packaged config name such as digits/default")
    p.set_defaults(func=_cmd_config)
    return parser


def _add_inference_commands(sub) -> None:
    """``predict`` and ``export``: a trained network on new images, or out of the package."""
    p = _command(sub, "predict", "label images with a checkpoint", overrides=False)
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True,
                   help="output folder: each input's path relative to the folder it was found in (a file given "
                        "directly: its stem) + _labels.png / _overlay.png, and predictions.json")
    p.add_argument("--student", action="store_true")
    p.add_argument("--scales", type=float, nargs="+", help="e.g. 0.5 1.0 2.0 (default: the run's eval.scales)")
    p.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--tile", type=int, nargs=2, metavar=("H", "W"), help="sliding-window tile size")
    p.add_argument("--cityscapes-ids", action="store_true",
                   help="also write labelId PNGs (OUT/cityscapes_label_ids/) for the Cityscapes test server")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_predict)

    p = _command(sub, "export", "write the weights-only inference file (.pt) or the ONNX graph (.onnx) of a checkpoint",
                 overrides=False)
    p.add_argument("checkpoint", help="a training checkpoint (step_N.pt, best.pt)")
    p.add_argument("out", help="output file, its format from the suffix: model.pt (weights) or model.onnx (ONNX, "
                               "dynamic batch and size); predict accepts both as --checkpoint")
    p.add_argument("--student", action="store_true", help="export the student instead of the EMA teacher")
    p.add_argument("--half", action="store_true", help="store the floating tensors as float16")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset of a .onnx output (default: 18)")
    p.set_defaults(func=_cmd_export)


def _add_comparison_commands(sub) -> None:
    """``demo`` and ``compare``: methods over seeds."""
    methods_help = "methods to compare (default: supervised cl scl; any method.name, e.g. fixmatch fixmatch_scl)"
    seeds_help = "train seeds; each method runs once per seed, paired by seed (default: 0)"
    jobs_help = "runs trained at once, in worker processes (default: 1); the results do not depend on it"
    p = _command(sub, "demo", "supervised vs cl vs scl on the embedded digit scenes")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seeds", nargs="+", default=["0"], help=seeds_help)
    p.add_argument("--methods", nargs="+", default=["supervised", "cl", "scl"], help=methods_help)
    p.add_argument("--jobs", type=int, default=1, help=jobs_help)
    p.set_defaults(func=_cmd_demo)

    p = _command(sub, "compare", "methods on any config over seeds: per-seed results, paired differences, curves")
    p.add_argument("config", nargs="?", help="YAML file or packaged config name")
    p.add_argument("--methods", nargs="*", default=["supervised", "cl", "scl"],
                   help=methods_help + "; with no name, only the variants are compared")
    p.add_argument("--variant", action="append", default=[], metavar="'LABEL: key=value ...'",
                   help="one more compared entry with its own overrides (repeatable), "
                        "e.g. 'scl_student: method.name=scl eval.use_teacher=false'")
    p.add_argument("--seeds", nargs="+", default=["0"], help=seeds_help)
    p.add_argument("--split", help="split that scores the runs (default: test)")
    p.add_argument("--jobs", type=int, default=1, help=jobs_help)
    p.add_argument("--out", help="folder of the <label>_seed<k>/ runs (default: runs/compare/<config name>)")
    p.add_argument("--summarize", metavar="DIR",
                   help="train nothing: rebuild summary.json, summary.md and learning_curves.png from DIR's run "
                        "folders")
    p.set_defaults(func=_cmd_compare)


#: Exit codes (README, "Commands").
EXIT_USAGE = 2  # a user error: config, file, data, flag
EXIT_NONFINITE = 3  # the loss or weights became NaN/Inf
EXIT_EVALUATION = 4  # an evaluation during training failed; its step's checkpoint is on disk


def _resume_hint(args: argparse.Namespace) -> str:
    from sclseg.engine import distributed as dist

    out = getattr(args, "run_dir", None) or args.out
    train = f"train {Path(out) / 'config.yaml'} --out {out} --resume"
    return f"torchrun <the same torchrun options> -m sclseg {train}" if dist.world_size() > 1 else f"sclseg {train}"


def _stopped(args: argparse.Namespace, exc) -> int:
    """Message and exit code of a training run stopped by :mod:`sclseg.engine.errors`."""
    from sclseg.engine import distributed as dist
    from sclseg.engine.errors import EvaluationFailed, NonFiniteLoss, TrainingInterrupted

    if isinstance(exc, TrainingInterrupted):
        code = 128 + exc.signum
        if not exc.immediate:
            tail = f"Resume with: {_resume_hint(args)}"
        elif exc.checkpoint is not None:
            tail = f"the newest whole checkpoint is {exc.checkpoint}; resume with: {_resume_hint(args)}"
        else:
            tail = "no checkpoint had been written yet"
    elif isinstance(exc, NonFiniteLoss):
        code = EXIT_NONFINITE
        tail = (f"the last good checkpoint is {exc.checkpoint}; after fixing the cause (e.g. a lower optim.lr) "
                f"continue from it with --resume {exc.checkpoint}" if exc.checkpoint
                else "no checkpoint had been written yet")
    else:
        assert isinstance(exc, EvaluationFailed)
        code = EXIT_EVALUATION
        tail = f"fix the eval settings or the data, then resume with: {_resume_hint(args)}"
    if dist.is_main():  # every rank stops alike; one message is enough
        print(f"sclseg {args.command}: {exc}\n{tail}", file=sys.stderr)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # section.key=value overrides may stand anywhere after the command
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra and args.command in ("predict", "export"):
        parser.error(f"{args.command} takes no config overrides")
    args.overrides = extra
    from sclseg.engine.errors import CheckpointWriteFailed, TrainingStopped

    try:
        return args.func(args)
    except TrainingStopped as exc:
        return _stopped(args, exc)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointWriteFailed) as exc:
        print(f"sclseg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the training loop (or predict's) catches it: nothing to save yet
        stage = ("before the first training step; no checkpoint was written" if args.command == "train"
                 else "before its results were written")
        print(f"sclseg {args.command}: interrupted {stage}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
