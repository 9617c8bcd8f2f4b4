"""The ``sclseg`` command: train, evaluate, predict, demo.

Every command prints a human-readable result and writes a JSON file beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from sclseg.config import Config, ConfigError, load_config, resolve_config_path

__all__ = ["main"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def _load(name: str, overrides: Sequence[str]) -> Config:
    return load_config(resolve_config_path(name), list(overrides))


def _cmd_train(args: argparse.Namespace) -> int:
    from sclseg.engine import distributed as dist
    from sclseg.engine.trainer import Trainer

    cfg = _load(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if args.dry_run:
        cfg.train.iterations = 1
        cfg.train.eval_interval = cfg.train.checkpoint_interval = cfg.train.log_interval = 1
        out = out / "dry_run"
    resume = {"latest": True, "auto": "auto"}.get(args.resume, args.resume)
    try:
        trainer = Trainer(cfg, out, resume=resume, existing="replace" if args.dry_run else "error")
        final = trainer.run(evaluate=not args.dry_run)
    finally:
        dist.cleanup()
    if dist.is_main():
        print(json.dumps({"out": str(out), **final}, indent=2, default=str))
    return 0


def _checkpoint_model(path: str, use_teacher: bool):
    from sclseg.engine.checkpoint import build_model_from_checkpoint, load_checkpoint

    ckpt = load_checkpoint(Path(path))
    model, cfg = build_model_from_checkpoint(ckpt, use_teacher=use_teacher, source=path)
    return model, cfg, ckpt


def _cmd_export(args: argparse.Namespace) -> int:
    from sclseg.engine.checkpoint import export_weights

    info = export_weights(Path(args.checkpoint), Path(args.out), use_teacher=not args.student,
                          dtype=torch.float16 if args.half else None)
    Path(args.out).with_name(Path(args.out).name + ".json").write_text(json.dumps(info, indent=2))
    print(f"wrote the {info['weights']} weights of step {info['iteration']} ({info['bytes'] / 1e6:.1f} MB) to {args.out}")
    return 0


def _device(request: str) -> torch.device:
    if request == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(request)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from sclseg.data import build_data

    if (args.checkpoint is None) == (args.predictions is None):
        raise ConfigError("evaluate needs exactly one of --checkpoint CKPT (score a model) or --predictions DIR (score PNGs)")
    cfg = _load(args.config, args.overrides)
    if args.split:
        cfg.eval.split = args.split
    data = build_data(cfg, for_training=False)
    if cfg.eval.split not in data.eval_splits:
        raise ConfigError(f"split '{cfg.eval.split}' not available; have {sorted(data.eval_splits)}")
    dataset = data.eval_splits[cfg.eval.split]
    if args.predictions is not None:
        from sclseg.engine.score_files import score_prediction_dir

        result = score_prediction_dir(dataset, Path(args.predictions))
        result |= {"split": cfg.eval.split, "predictions": str(args.predictions)}
        default_out = Path(args.predictions) / f"eval_{cfg.eval.split}.json"
    else:
        from sclseg.engine.evaluate import evaluate_model

        device = _device(cfg.train.device)
        model, _, ckpt = _checkpoint_model(args.checkpoint, use_teacher=not args.student)
        if ckpt["num_classes"] != data.num_classes:
            raise ValueError(f"{args.checkpoint}: {ckpt['num_classes']} classes, but the config's data has {data.num_classes}")
        result = evaluate_model(model.to(device), dataset, cfg.eval, device=device)
        result |= {"split": cfg.eval.split, "checkpoint": str(args.checkpoint),
                   "weights": "student" if args.student else "teacher", "iteration": ckpt["iteration"]}
        default_out = Path(args.checkpoint).with_name(f"eval_{cfg.eval.split}.json")
    out = Path(args.out) if args.out else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{cfg.eval.split}: mIoU {result['miou']:.2f} ({result['eval_mode']}, {result['images']} images) -> {out}")
    for name, iou in result["per_class_iou"].items():
        print(f"  {name:>16s} {'-' if iou is None else f'{iou:6.2f}'}")
    return 0


def _input_files(inputs: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {', '.join(inputs)}")
    return files


def _cmd_predict(args: argparse.Namespace) -> int:
    from sclseg.engine.inference import predict_probs
    from sclseg.viz import colorize, overlay

    device = _device(args.device)
    model, cfg, ckpt = _checkpoint_model(args.checkpoint, use_teacher=not args.student)
    model.to(device).eval()
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(ckpt["class_colors"])] = np.asarray(ckpt["class_colors"], dtype=np.uint8)
    scales = args.scales if args.scales else cfg.eval.scales
    tile = args.tile if args.tile else cfg.eval.tile
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in _input_files(args.inputs):
        try:
            rgb = np.array(Image.open(path).convert("RGB"))
        except OSError as exc:
            raise ValueError(f"{path}: cannot read image ({exc})") from exc
        image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255).to(device)
        probs = predict_probs(model, image, scales=scales, flip=args.flip or cfg.eval.flip, tile=tile,
                              overlap=cfg.eval.tile_overlap)
        labels = probs.argmax(1)[0].cpu().numpy().astype(np.uint8)
        label_png = Image.fromarray(labels, mode="P")
        label_png.putpalette(palette.flatten().tolist())
        label_path = out / f"{path.stem}_labels.png"
        label_png.save(label_path)
        overlay_path = out / f"{path.stem}_overlay.png"
        Image.fromarray(np.concatenate([overlay(rgb, labels, palette), colorize(labels, palette)], axis=1)).save(overlay_path)
        entry = {"input": str(path), "labels": str(label_path), "overlay": str(overlay_path)}
        if args.cityscapes_ids:
            from sclseg.engine.score_files import write_cityscapes_prediction

            submission = write_cityscapes_prediction(labels, path.stem, out / "cityscapes_label_ids", size=None)
            entry["cityscapes_label_ids"] = str(submission["label_ids"])
        written.append(entry)
    (out / "predictions.json").write_text(json.dumps({"checkpoint": str(args.checkpoint), "class_names": ckpt["class_names"],
                                                      "files": written}, indent=2))
    print(f"wrote {len(written)} label maps and overlays to {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sclseg.demo import run_demo

    run_demo(Path(args.out), seeds=args.seeds, overrides=args.overrides, methods=args.methods)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sclseg", description=__doc__)
    parser.epilog = "Config overrides (train, evaluate, demo): section.key=value, e.g. method.name=cl train.iterations=200"
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML file, or a packaged config name such as digits/default")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from the newest checkpoint in --out, or from the given file; "
                        "'--resume auto' starts afresh when --out holds no checkpoint (for requeued jobs)")
    p.add_argument("--dry-run", action="store_true", help="build everything, run one step, exit")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="score a checkpoint on a split of the config's data")
    p.add_argument("config")
    p.add_argument("--checkpoint", help="score this checkpoint's model")
    p.add_argument("--predictions", help="score the prediction PNGs in this folder instead of a model")
    p.add_argument("--split", help="split to score (default: eval.split)")
    p.add_argument("--student", action="store_true", help="use the student instead of the EMA teacher")
    p.add_argument("--out", help="JSON output (default: eval_<split>.json beside the checkpoint)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="label images with a checkpoint")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--student", action="store_true")
    p.add_argument("--scales", type=float, nargs="+", help="e.g. 0.5 1.0 2.0 (default: the run's eval.scales)")
    p.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    p.add_argument("--tile", type=int, nargs=2, metavar=("H", "W"), help="sliding-window tile size")
    p.add_argument("--cityscapes-ids", action="store_true",
                   help="also write labelId PNGs (OUT/cityscapes_label_ids/) for the Cityscapes test server")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="write the weights-only inference file of a checkpoint")
    p.add_argument("checkpoint", help="a training checkpoint (step_N.pt, best.pt)")
    p.add_argument("out", help="output file (e.g. model.pt); predict and evaluate accept it as --checkpoint")
    p.add_argument("--student", action="store_true", help="export the student instead of the EMA teacher")
    p.add_argument("--half", action="store_true", help="store the floating tensors as float16")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="supervised vs cl vs scl on the embedded digit scenes")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=["supervised", "cl", "scl"], choices=["supervised", "cl", "scl"])
    p.set_defaults(func=_cmd_demo)
    return parser


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
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"sclseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from sclseg.engine.trainer import NonFiniteLoss, TrainingInterrupted

        if isinstance(exc, (TrainingInterrupted, NonFiniteLoss)):
            from sclseg.engine import distributed as dist

            if dist.is_main():  # every rank stops alike; one message is enough
                print(f"sclseg {args.command}: {exc}", file=sys.stderr)
            return exc.exit_code if isinstance(exc, TrainingInterrupted) else 3
        raise


if __name__ == "__main__":
    sys.exit(main())
