"""The training loop: streams, SGD with poly lr, evaluation, checkpoints, logs, resume, DDP.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON
object per log line and per evaluation), ``step_N.pt`` (the newest ``train.keep_last``),
``best.pt`` (best teacher/student mIoU on the eval split), ``final.json`` and TensorBoard
scalars under ``tb/`` when TensorBoard is installed. Only rank 0 writes files and logs.

Resilience:

* SIGINT/SIGTERM finish the current step, write a checkpoint and raise
  :class:`TrainingInterrupted` (the CLI exits with ``128 + signal``) with the command that
  resumes; a second signal stops at once.
* ``--resume`` continues bit for bit: checkpoints hold the weights, optimizer, lr schedule,
  scaler, iteration, data stream positions and every RNG state of every rank.
* A NaN/Inf loss stops the run (:class:`NonFiniteLoss`) naming the step; no checkpoint is
  written after it, so the newest ``step_N.pt`` is the last good one.

Distributed: under torchrun the student is wrapped in DDP with synchronized BatchNorm; the
teacher is a plain (unsynchronized) EMA copy in eval mode, identical on every rank. See
docs/distributed.md.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import yaml
from torch import nn

from sclseg.config import Config, ConfigError, config_to_dict
from sclseg.cutmix import BoxMaskGenerator
from sclseg.data import DataBundle, build_data
from sclseg.engine import distributed as dist
from sclseg.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune,
    rng_state,
    save_atomic,
    set_rng_state,
)
from sclseg.engine.evaluate import evaluate_model
from sclseg.engine.optim import build_optimizer
from sclseg.engine.step import train_step, unlabeled_weight
from sclseg.engine.stream import batch_to_device, make_stream
from sclseg.models import create_model
from sclseg.teacher import MeanTeacher, unwrap

__all__ = ["Trainer", "TrainingInterrupted", "NonFiniteLoss"]

_AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_NO_BAD = 1 << 62  # "no non-finite loss yet" in the device-side watch
_RUN_FILES = ("metrics.jsonl", "final.json", "best.pt")


class TrainingInterrupted(RuntimeError):
    """Raised after a signal stopped the run (and, for the first signal, its checkpoint was written)."""

    def __init__(self, message: str, *, signum: Optional[int] = None, checkpoint: Optional[Path] = None) -> None:
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + signal number."""
        return 128 + int(self.signum) if self.signum else 130


class NonFiniteLoss(RuntimeError):
    """The loss (or the weights) became NaN or Inf; the last good checkpoint is kept."""

    def __init__(self, message: str, *, step: Optional[int] = None, checkpoint: Optional[Path] = None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


def _rank_seed(seed: int, rank: int, stream: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + stream * 104_729) % (1 << 62)


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


class Trainer:
    """Runs one training job described by a :class:`Config` into ``out_dir``.

    Args:
        resume: None/False (fresh run), True (newest ``step_N.pt`` in ``out_dir``, an error if
            there is none), ``"auto"`` (the newest if there is one, else a fresh run: for job
            scripts that are requeued) or a checkpoint path.
        data: pre-built datasets (default: built from ``cfg``).
        existing: what a fresh run does with the checkpoints of an earlier run in ``out_dir``:
            ``"replace"`` (delete them and the earlier metrics) or ``"error"``.
    """

    def __init__(
        self,
        cfg: Config,
        out_dir: Union[str, Path],
        *,
        resume: Union[None, bool, str, Path] = None,
        data: Optional[DataBundle] = None,
        show_progress: bool = True,
        existing: str = "replace",
    ) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        t = cfg.train
        self._check_config()
        self.device = dist.setup(t.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        if t.amp == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"train.amp=bf16: {torch.cuda.get_device_name(self.device)} has no bfloat16 support; "
                              "use train.amp=fp16 (with loss scaling) or off")
        self.show_progress = show_progress and self.main
        resume_path = self._resume_path(resume)
        if resume_path is None and existing not in ("replace", "error"):
            raise ValueError(f"existing must be 'replace' or 'error', got {existing!r}")

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.data = data if data is not None else build_data(cfg)
        num_classes = self.data.num_classes
        model = create_model(cfg.model, num_classes, load_pretrained=resume_path is None).to(self.device)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.mean_teacher = MeanTeacher(model, cfg.method.ema_decay)  # plain BatchNorm, eval mode
        if self.world > 1:
            if t.sync_bn:
                model = dist.convert_sync_batchnorm(model, self.device)
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if t.compile:
            model = torch.compile(model)
        self.student = model
        self.optimizer, self.scheduler = build_optimizer(model.parameters(), cfg.optim, t.iterations)
        self.mask_generator = BoxMaskGenerator(cfg.method.n_boxes, cfg.method.box_area)
        # CutMix boxes and SCL pairs: one generator per rank; the global RNGs (dropout, ...) too
        self.generator = torch.Generator(device=self.device).manual_seed(_rank_seed(t.seed, self.rank, 1))
        torch.manual_seed(_rank_seed(t.seed, self.rank, 2))
        random.seed(_rank_seed(t.seed, self.rank, 3))
        np.random.seed(_rank_seed(t.seed, self.rank, 4) % (1 << 32))
        self.amp_dtype = _AMP[t.amp]
        self.scaler = torch.amp.GradScaler(self.device.type) if t.amp == "fp16" else None
        self._writer = None
        self.iteration = 0
        self.stream_positions = {"labeled": 0, "unlabeled": 0}
        self.best: dict = {"miou": -math.inf, "iteration": None}
        self._stop_signal: Optional[int] = None
        self._saved_at: Optional[int] = None
        self._first_bad = torch.full((), _NO_BAD, dtype=torch.long, device=self.device)

        if resume_path is not None:
            self._restore(load_checkpoint(resume_path, map_location="cpu", kind="checkpoint"), resume_path)
            self._log(f"resumed from {resume_path} at step {self.iteration} of {t.iterations}")
            if self.main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                if not (self.out_dir / "config.yaml").exists():  # resuming another run's checkpoint here
                    (self.out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
                self._truncate_metrics()
                self._record({"kind": "resume", "iteration": self.iteration, "checkpoint": str(resume_path)})
        else:
            if self.main:
                self._prepare_fresh_dir(existing)
            dist.barrier()

    # ----------------------------------------------------------------- set-up
    def _check_config(self) -> None:
        t = self.cfg.train
        for key in ("grad_accum", "keep_last", "log_interval", "eval_interval", "checkpoint_interval"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
        if self.cfg.data.batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {self.cfg.data.batch_size}")

    def _resume_path(self, resume: Union[None, bool, str, Path]) -> Optional[Path]:
        """The checkpoint to resume from (rank 0 decides, every rank gets its answer)."""
        if resume is None or resume is False:
            return None
        if resume is True or resume == "auto":
            found = latest_checkpoint(self.out_dir) if self.main else None
            found = dist.all_gather_object(None if found is None else str(found))[0]
            if found is None and resume is True:
                raise FileNotFoundError(f"--resume: no step_N.pt checkpoint in {self.out_dir}; expected the folder of "
                                        "an earlier run (its --out), or pass --resume PATH")
            return None if found is None else Path(found)
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"--resume {path}: checkpoint not found")
        return path

    def _prepare_fresh_dir(self, existing: str) -> None:
        stale = [p for _, p in list_checkpoints(self.out_dir)]
        if stale and existing == "error":
            raise ConfigError(
                f"{self.out_dir} already holds checkpoints of a run ({stale[-1].name}); continue it with --resume, "
                "or choose another --out (or delete the folder) to start afresh"
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if stale or any((self.out_dir / name).exists() for name in _RUN_FILES):
            self._log(f"fresh run in {self.out_dir}: removing the earlier run's checkpoints and metrics")
            for path in stale:
                path.unlink(missing_ok=True)
            for name in _RUN_FILES:
                (self.out_dir / name).unlink(missing_ok=True)
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything the run needs to continue exactly. Collective under DDP (every rank calls it)."""
        per_rank = dist.all_gather_object({"generator": self.generator.get_state().cpu(), "rng": rng_state()})
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.cfg),
            "num_classes": self.data.num_classes,
            "class_names": [c.name for c in self.data.classes],
            "class_colors": [list(c.color) for c in self.data.classes],
            "iteration": self.iteration,
            "world_size": self.world,
            "student": unwrap(self.student).state_dict(),
            "teacher": self.mean_teacher.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "streams": dict(self.stream_positions),
            "generators": [r["generator"] for r in per_rank],
            "rng": [r["rng"] for r in per_rank],
            "best": dict(self.best),
        }

    def _restore(self, ckpt: dict, path: Path) -> None:
        classes = ckpt.get("num_classes")
        if classes != self.data.num_classes:
            names = ckpt.get("class_names") or []
            raise ValueError(
                f"{path}: checkpoint was trained for {classes} classes ({', '.join(map(str, names[:12]))}) but this "
                f"run's data has {self.data.num_classes} ({', '.join(c.name for c in self.data.classes[:12])}); "
                "expected a checkpoint of the same classes"
            )
        saved_model = ckpt.get("config", {}).get("model", {})
        wanted = config_to_dict(self.cfg)["model"]
        differ = [k for k in wanted if k != "pretrained" and k in saved_model and saved_model[k] != wanted[k]]
        if differ:
            raise ValueError(
                f"{path}: checkpoint holds a different model ("
                + ", ".join(f"model.{k}={saved_model[k]!r}" for k in differ)
                + ") than the config asks for ("
                + ", ".join(f"model.{k}={wanted[k]!r}" for k in differ)
                + f"); resume with the run's own config ({path.parent / 'config.yaml'})"
            )
        try:
            unwrap(self.student).load_state_dict(ckpt["student"])
            self.mean_teacher.teacher.load_state_dict(ckpt["teacher"])
        except RuntimeError as exc:
            raise ValueError(f"{path}: checkpoint weights do not fit model '{self.cfg.model.name}': {exc}") from exc
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.best = dict(ckpt["best"])
        accum = self.cfg.train.grad_accum
        self.stream_positions = dict(ckpt.get("streams") or {"labeled": self.iteration * accum,
                                                            "unlabeled": self.iteration * accum})
        generators, rngs = ckpt["generators"] if "generators" in ckpt else [ckpt["generator"]], ckpt["rng"]
        rngs = rngs if isinstance(rngs, list) else [rngs]
        saved_world = int(ckpt.get("world_size", len(generators)))
        if saved_world == self.world and len(generators) == self.world:
            self.generator.set_state(generators[self.rank].cpu())
            set_rng_state(rngs[self.rank])
        else:
            self._log(f"warning: {path} was written by {saved_world} process(es), this run has {self.world}: the "
                      "random streams are re-seeded and the data streams re-split, so the continuation is not bit "
                      "for bit what the original run would have done")
            self.generator.manual_seed(_rank_seed(self.cfg.train.seed + self.iteration, self.rank, 1))
            torch.manual_seed(_rank_seed(self.cfg.train.seed + self.iteration, self.rank, 2))
            per_rank = self.cfg.data.batch_size * saved_world // self.world
            if per_rank != self.cfg.data.batch_size:
                self._log(f"warning: keep the global batch: data.batch_size={per_rank} on {self.world} processes "
                          f"equals {self.cfg.data.batch_size} on {saved_world}")
            self.stream_positions = {k: v * saved_world // self.world for k, v in self.stream_positions.items()}
        changed = {
            k: (v, _flatten(config_to_dict(self.cfg)).get(k))
            for k, v in _flatten(ckpt.get("config", {})).items()
            if _flatten(config_to_dict(self.cfg)).get(k) != v
        }
        if changed:
            self._log("resuming with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))

    def _truncate_metrics(self) -> None:
        """Drop metric records written after the resumed checkpoint (they are redone)."""
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a hard kill
                continue
            if int(record.get("iteration", 0)) <= self.iteration:
                kept.append(line)
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def _weights_finite(self) -> bool:
        tensors = [p for p in unwrap(self.student).parameters()] + [p for p in self.mean_teacher.teacher.parameters()]
        return bool(torch.stack([torch.isfinite(p).all() for p in tensors]).all())

    def save(self, name: Optional[str] = None) -> Optional[Path]:
        """Write ``step_N.pt`` (or ``name``) from rank 0 and prune old step files.

        Collective under DDP. Never writes after a non-finite loss or with non-finite weights
        (raises :class:`NonFiniteLoss` instead), so every checkpoint on disk is a good one.
        """
        self._check_loss()
        if not self._weights_finite():
            last = latest_checkpoint(self.out_dir)
            raise NonFiniteLoss(
                f"the weights became NaN/Inf by step {self.iteration}; stopped without writing a checkpoint. "
                + (f"The last good checkpoint is {last}." if last else "No checkpoint had been written yet."),
                step=self.iteration, checkpoint=last,
            )
        state = self.state_dict()
        if name is None:
            self._saved_at = self.iteration
        if not self.main:
            return None
        path = self.out_dir / (name or f"step_{self.iteration}.pt")
        save_atomic(state, path)
        if name is None:
            prune(self.out_dir, self.cfg.train.keep_last)
        return path

    # ----------------------------------------------------------------- logs
    def _log(self, message: str) -> None:
        if self.main:
            print(message, file=sys.stderr, flush=True)

    def _record(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self._writer.add_scalar(key, value, record["iteration"])

    def _open_writer(self):
        if not self.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.out_dir / "tb"))

    # ----------------------------------------------------------------- eval
    def evaluate(self) -> dict:
        """Evaluate student and teacher on the eval split; returns the record written.

        Collective under DDP (the ranks share the images and sum one confusion matrix). The
        training RNG streams are left untouched, so evaluating never changes the training.
        """
        split = self.cfg.eval.split
        if split not in self.data.eval_splits:
            raise ConfigError(f"eval.split '{split}' not available; have {sorted(self.data.eval_splits)}")
        dataset = self.data.eval_splits[split]
        record: dict = {"iteration": self.iteration, "split": split}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            for role, model in (("teacher", self.mean_teacher.teacher), ("student", unwrap(self.student))):
                result = evaluate_model(model, dataset, self.cfg.eval, device=self.device)
                record[f"{role}_miou"] = result["miou"]
                record[f"{role}_per_class_iou"] = result["per_class_iou"]
                record["eval_mode"] = result["eval_mode"]
        chosen = "teacher" if self.cfg.eval.use_teacher else "student"
        record["miou"] = record[f"{chosen}_miou"]
        if record["miou"] > self.best["miou"]:
            self.best = {"miou": record["miou"], "iteration": self.iteration}
            self.save("best.pt")
        self._record({k: v for k, v in record.items() if not k.endswith("per_class_iou")} | {"kind": "eval"})
        return record

    # ----------------------------------------------------------------- loop
    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self._stop_signal is not None:  # a second signal: stop now, without a checkpoint
            last = latest_checkpoint(self.out_dir)
            raise TrainingInterrupted(
                f"{signal.Signals(signum).name} received twice: stopped at once during step {self.iteration + 1}, "
                f"without a checkpoint; the newest checkpoint is {last}", signum=signum, checkpoint=last,
            )
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        """Whether any rank received a stop signal (so that all ranks stop after the same step)."""
        local = self._stop_signal is not None
        if self.world == 1:
            return local
        flag = torch.tensor([self._stop_signal or 0], dtype=torch.long, device=self.device)
        dist.all_reduce_max(flag)
        if self._stop_signal is None and int(flag) > 0:
            self._stop_signal = int(flag)
        return int(flag) > 0

    def _check_loss(self) -> None:
        """Raise :class:`NonFiniteLoss` if any rank saw a NaN/Inf loss (one host sync)."""
        bad = self._first_bad.clone()
        if self.world > 1:
            dist.all_reduce_min(bad)
        step = int(bad)
        if step == _NO_BAD:
            return
        last = latest_checkpoint(self.out_dir)
        self._record({"kind": "nonfinite", "iteration": step + 1, "last_good_checkpoint": str(last) if last else None})
        where = (f"The last good checkpoint is {last} (step {last.stem.split('_')[-1]}); after fixing the cause "
                 f"(e.g. a lower optim.lr) continue from it with --resume {last}" if last
                 else "No checkpoint had been written yet")
        raise NonFiniteLoss(
            f"the loss became NaN/Inf at step {step + 1} of {self.cfg.train.iterations}; training stopped and no "
            f"checkpoint was written after it. {where}",
            step=step + 1, checkpoint=last,
        )

    def _stream(self, role: str):
        """The ``labeled`` or ``unlabeled`` stream, from this run's position in it."""
        d = self.cfg.data
        dataset, batch_size, offset = {"labeled": (self.data.labeled, d.batch_size, 1),
                                       "unlabeled": (self.data.unlabeled, d.unlabeled_batch_size, 2)}[role]
        return make_stream(dataset, batch_size, seed=self.cfg.train.seed * 2 + offset,
                           start_batch=self.stream_positions[role], name=role, rank=self.rank, world_size=self.world,
                           num_workers=d.num_workers, pin_memory=self.device.type == "cuda")

    def _to_device(self, batch: dict) -> dict:
        return batch_to_device(batch, self.device, channels_last=self.cfg.train.channels_last)

    def _resume_command(self) -> str:
        config = self.out_dir / "config.yaml"
        if self.world > 1:
            return (f"torchrun <the same torchrun options> -m sclseg train {config} --out {self.out_dir} --resume")
        return f"sclseg train {config} --out {self.out_dir} --resume"

    def run(self, *, evaluate: bool = True, until: Optional[int] = None) -> dict:
        """Train to ``train.iterations``; returns the final record (also in ``final.json``).

        ``evaluate=False`` skips the evaluation passes (used by ``--dry-run``). ``until`` stops
        after that many steps (of the same ``train.iterations`` schedule) with a checkpoint, as a
        pre-emption would; ``--resume`` continues from there.
        """
        cfg, t = self.cfg, self.cfg.train
        stop_at = t.iterations if until is None else min(int(until), t.iterations)
        done = self.out_dir / "final.json"
        if self.iteration >= t.iterations and done.is_file():  # resumed a finished run: nothing to do
            return json.loads(done.read_text())
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = {}
        if in_main_thread:
            previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self._writer = self._open_writer()
        labeled = unlabeled = None
        progress = None
        sums: dict[str, torch.Tensor] = {}
        steps_in_window = 0
        window_start = time.perf_counter()
        last_eval: Optional[dict] = None
        accum = t.grad_accum
        try:
            if cfg.method.name != "supervised" and self.data.unlabeled is None:
                raise ConfigError(f"method.name '{cfg.method.name}' needs unlabeled images but the data has none")
            labeled = self._stream("labeled")
            if self.show_progress:
                from tqdm import tqdm

                progress = tqdm(total=t.iterations, initial=self.iteration, desc=cfg.method.name, dynamic_ncols=True)
            while self.iteration < stop_at:
                batches = [self._to_device(next(labeled)) for _ in range(accum)]
                weight = unlabeled_weight(cfg.method, self.iteration)
                # step k always goes with unlabeled batches k*accum...: a step that does not use them
                # (weight 0: supervised, warm-up) skips them unloaded. Every method thus reaches step
                # `unlabeled_start` in the same state, and which batch a step sees does not depend on
                # the length of the warm-up
                ubatches = None
                if weight > 0.0:
                    if unlabeled is None:
                        unlabeled = self._stream("unlabeled")
                    ubatches = [self._to_device(next(unlabeled)) for _ in range(accum)]
                lr = self.optimizer.param_groups[0]["lr"]
                terms = train_step(
                    self.student,
                    self.mean_teacher,
                    self.optimizer,
                    self.scheduler,
                    batches if accum > 1 else batches[0],
                    (ubatches if accum > 1 else ubatches[0]) if ubatches is not None else None,
                    method=cfg.method,
                    mask_generator=self.mask_generator,
                    generator=self.generator,
                    weight=weight,
                    ignore_index=self.data.ignore_index,
                    amp_dtype=self.amp_dtype,
                    scaler=self.scaler,
                )
                # device-side NaN watch: no host sync per step
                bad_now = torch.where(torch.isfinite(terms["loss"]), _NO_BAD, self.iteration)
                self._first_bad = torch.minimum(self._first_bad, bad_now)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().float()
                steps_in_window += 1
                self.iteration += 1
                # drawn or skipped, a step moves the unlabeled position by accum
                self.stream_positions = {"labeled": labeled.batches,
                                         "unlabeled": self.stream_positions["unlabeled"] + accum}
                if progress is not None:
                    progress.update(1)

                at_end = self.iteration >= t.iterations
                stopping = self._stop_requested()
                if self.iteration % t.log_interval == 0 or at_end or stopping or self.iteration == stop_at:
                    self._check_loss()
                    elapsed = time.perf_counter() - window_start
                    record = {k: float(v) / steps_in_window for k, v in sums.items()}
                    record |= {"iteration": self.iteration, "lr": lr, "unlabeled_weight": weight,
                               "it_per_s": steps_in_window / max(elapsed, 1e-9), "kind": "train"}
                    self._record(record)
                    if progress is not None:
                        progress.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k.startswith("loss")} | {"lr": f"{lr:.2e}"})
                    sums, steps_in_window, window_start = {}, 0, time.perf_counter()
                if evaluate and (self.iteration % t.eval_interval == 0 or at_end):
                    self._check_loss()
                    last_eval = self.evaluate()
                    if progress is not None:
                        progress.write(
                            f"[{self.iteration}] {last_eval['split']} mIoU teacher {last_eval['teacher_miou']:.2f}"
                            f" student {last_eval['student_miou']:.2f} ({last_eval['eval_mode']})"
                        )
                if self.iteration % t.checkpoint_interval == 0 or at_end:
                    self.save()
                if stopping and not at_end:
                    if self._saved_at != self.iteration:
                        self.save()
                    path = self.out_dir / f"step_{self.iteration}.pt"
                    name = signal.Signals(self._stop_signal).name
                    raise TrainingInterrupted(
                        f"{name} received: stopped after step {self.iteration} of {t.iterations}, checkpoint {path}.\n"
                        f"Resume with: {self._resume_command()}",
                        signum=self._stop_signal, checkpoint=path,
                    )
            if self.iteration < t.iterations:  # stopped by `until`
                if self._saved_at != self.iteration:
                    self.save()
                return {"iteration": self.iteration, "stopped": True, "method": cfg.method.name,
                        "checkpoint": str(self.out_dir / f"step_{self.iteration}.pt"), "best": self.best}
        finally:
            for stream in (labeled, unlabeled):
                if stream is not None:
                    stream.close()
            if progress is not None:
                progress.close()
            if self._writer is not None:
                self._writer.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        final = {
            "iteration": self.iteration,
            "method": cfg.method.name,
            "world_size": self.world,
            "best": self.best,
            "last_eval": last_eval,
        }
        if self.main:
            (self.out_dir / "final.json").write_text(json.dumps(final, indent=2))
        return final
