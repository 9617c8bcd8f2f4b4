"""The training loop: streams, SGD with poly lr, evaluation, checkpoints, logs, resume.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON
object per log line and per evaluation), ``step_N.pt`` (the newest ``keep_last``),
``best.pt`` (best teacher/student mIoU on the eval split), ``final.json`` and TensorBoard
scalars under ``tb/`` when TensorBoard is installed. SIGINT/SIGTERM finish the current step,
write a checkpoint and exit; ``--resume`` continues bit for bit.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Union

import torch
import yaml
from torch import nn

from sclseg.config import Config, ConfigError, config_from_dict, config_to_dict
from sclseg.cutmix import BoxMaskGenerator
from sclseg.data import DataBundle, build_data
from sclseg.engine import distributed as dist
from sclseg.engine.checkpoint import latest_checkpoint, load_checkpoint, prune, rng_state, save_atomic, set_rng_state
from sclseg.engine.evaluate import evaluate_model
from sclseg.engine.step import train_step, unlabeled_weight
from sclseg.engine.stream import make_stream
from sclseg.models import create_model
from sclseg.teacher import MeanTeacher, unwrap

__all__ = ["Trainer", "TrainingInterrupted", "NonFiniteLoss", "build_model_from_checkpoint"]

_AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingInterrupted(RuntimeError):
    """Raised after a signal stopped the run and its checkpoint was written."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


def build_model_from_checkpoint(ckpt: dict, *, use_teacher: bool = True) -> tuple[nn.Module, Config]:
    """The network stored in a checkpoint (teacher/EMA weights by default) and its config."""
    cfg = config_from_dict(ckpt["config"])
    model = create_model(cfg.model, ckpt["num_classes"], load_pretrained=False)
    key = "teacher" if use_teacher and "teacher" in ckpt else "student"
    try:
        model.load_state_dict(ckpt[key])
    except RuntimeError as exc:
        raise ValueError(f"checkpoint weights do not fit model '{cfg.model.name}' with {ckpt['num_classes']} classes: {exc}") from exc
    return model, cfg


class Trainer:
    """Runs one training job described by a :class:`Config` into ``out_dir``."""

    def __init__(
        self,
        cfg: Config,
        out_dir: Union[str, Path],
        *,
        resume: Union[None, bool, str, Path] = None,
        data: Optional[DataBundle] = None,
        show_progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.device = dist.setup(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        self.show_progress = show_progress and self.main
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.data = data if data is not None else build_data(cfg)
        num_classes = self.data.num_classes

        model = create_model(cfg.model, num_classes, load_pretrained=not resume).to(self.device)
        self.mean_teacher = MeanTeacher(model, cfg.method.ema_decay)
        if self.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.student = model
        o = cfg.optim
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
        )
        total = cfg.train.iterations
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: max(0.0, 1.0 - it / total) ** o.poly_power
        )
        self.mask_generator = BoxMaskGenerator(cfg.method.n_boxes, cfg.method.box_area)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.train.seed * 1000 + self.rank + 1)
        self.amp_dtype = _AMP[cfg.train.amp]
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.train.amp == "fp16" else None
        self._writer = None
        self.iteration = 0
        self.best = {"miou": -math.inf, "iteration": None}
        self._stop_signal: Optional[int] = None

        if resume:
            path = latest_checkpoint(self.out_dir) if resume is True else Path(resume)
            if path is None:
                raise FileNotFoundError(f"--resume: no step_N.pt checkpoint in {self.out_dir}")
            self._restore(load_checkpoint(path, map_location=self.device))
            self._log(f"resumed from {path} at iteration {self.iteration}")
        elif self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "format": "sclseg-checkpoint-1",
            "config": config_to_dict(self.cfg),
            "num_classes": self.data.num_classes,
            "class_names": [c.name for c in self.data.classes],
            "class_colors": [list(c.color) for c in self.data.classes],
            "iteration": self.iteration,
            "student": unwrap(self.student).state_dict(),
            "teacher": self.mean_teacher.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "generator": self.generator.get_state(),
            "rng": rng_state(),
            "best": dict(self.best),
        }

    def _restore(self, ckpt: dict) -> None:
        if ckpt.get("num_classes") != self.data.num_classes:
            raise ValueError(
                f"checkpoint has {ckpt.get('num_classes')} classes but the data has {self.data.num_classes}"
            )
        try:
            unwrap(self.student).load_state_dict(ckpt["student"])
            self.mean_teacher.teacher.load_state_dict(ckpt["teacher"])
        except RuntimeError as exc:
            raise ValueError(f"checkpoint does not fit model '{self.cfg.model.name}': {exc}") from exc
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.generator.set_state(ckpt["generator"].to("cpu"))
        set_rng_state(ckpt["rng"])
        self.iteration = int(ckpt["iteration"])
        self.best = dict(ckpt["best"])

    def save(self, name: Optional[str] = None) -> Optional[Path]:
        """Write ``step_N.pt`` (or ``name``) from rank 0 and prune old step files."""
        if not self.main:
            return None
        path = self.out_dir / (name or f"step_{self.iteration}.pt")
        save_atomic(self.state_dict(), path)
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
        """Evaluate student and teacher on the eval split; returns the record written."""
        split = self.cfg.eval.split
        if split not in self.data.eval_splits:
            raise ConfigError(f"eval.split '{split}' not available; have {sorted(self.data.eval_splits)}")
        dataset = self.data.eval_splits[split]
        record: dict = {"iteration": self.iteration, "split": split}
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
        self._stop_signal = signum

    def _streams(self):
        cfg = self.cfg
        kwargs = dict(
            rank=self.rank,
            world_size=self.world,
            start_batch=self.iteration,
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        labeled = make_stream(self.data.labeled, cfg.data.batch_size, seed=cfg.train.seed * 2 + 1, **kwargs)
        unlabeled = None
        if cfg.method.name != "supervised":
            if self.data.unlabeled is None:
                raise ConfigError(f"method.name '{cfg.method.name}' needs unlabeled images but the data has none")
            unlabeled = make_stream(self.data.unlabeled, cfg.data.unlabeled_batch_size, seed=cfg.train.seed * 2 + 2, **kwargs)
        return labeled, unlabeled

    def _to_device(self, batch: Optional[dict]) -> Optional[dict]:
        if batch is None:
            return None
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def run(self, *, evaluate: bool = True) -> dict:
        """Train to ``train.iterations``; returns the final record (also in ``final.json``).

        ``evaluate=False`` skips the evaluation passes (used by ``--dry-run``).
        """
        cfg = self.cfg
        self._writer = self._open_writer()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        labeled, unlabeled = self._streams()
        progress = None
        if self.show_progress:
            from tqdm import tqdm

            progress = tqdm(total=cfg.train.iterations, initial=self.iteration, desc=cfg.method.name, dynamic_ncols=True)
        sums: dict[str, torch.Tensor] = {}
        steps_in_window = 0
        first_bad = torch.tensor(-1, device=self.device)
        window_start = time.perf_counter()
        last_eval: Optional[dict] = None
        try:
            while self.iteration < cfg.train.iterations:
                batch = self._to_device(next(labeled))
                ubatch = self._to_device(next(unlabeled)) if unlabeled is not None else None
                weight = unlabeled_weight(cfg.method, self.iteration)
                lr = self.optimizer.param_groups[0]["lr"]
                terms = train_step(
                    self.student,
                    self.mean_teacher,
                    self.optimizer,
                    self.scheduler,
                    batch,
                    ubatch,
                    method=cfg.method,
                    mask_generator=self.mask_generator,
                    generator=self.generator,
                    weight=weight,
                    ignore_index=self.data.ignore_index,
                    amp_dtype=self.amp_dtype,
                    scaler=self.scaler,
                )
                # device-side NaN watch: no host sync per step
                bad_now = ~torch.isfinite(terms["loss"])
                first_bad = torch.where((first_bad < 0) & bad_now, torch.tensor(self.iteration, device=self.device), first_bad)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + value
                steps_in_window += 1
                self.iteration += 1
                if progress is not None:
                    progress.update(1)

                at_end = self.iteration == cfg.train.iterations
                if self.iteration % cfg.train.log_interval == 0 or at_end or self._stop_signal is not None:
                    bad = int(first_bad)
                    if bad >= 0:
                        raise NonFiniteLoss(
                            f"loss became NaN/Inf at iteration {bad}; the last good checkpoint in {self.out_dir} is kept"
                        )
                    elapsed = time.perf_counter() - window_start
                    record = {k: float(v) / steps_in_window for k, v in sums.items()}
                    record |= {"iteration": self.iteration, "lr": lr, "unlabeled_weight": weight,
                               "it_per_s": steps_in_window / max(elapsed, 1e-9), "kind": "train"}
                    self._record(record)
                    if progress is not None:
                        progress.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k.startswith("loss")} | {"lr": f"{lr:.2e}"})
                    sums, steps_in_window, window_start = {}, 0, time.perf_counter()
                if evaluate and (self.iteration % cfg.train.eval_interval == 0 or at_end):
                    last_eval = self.evaluate()
                    if progress is not None:
                        progress.write(
                            f"[{self.iteration}] {last_eval['split']} mIoU teacher {last_eval['teacher_miou']:.2f}"
                            f" student {last_eval['student_miou']:.2f} ({last_eval['eval_mode']})"
                        )
                if self.iteration % cfg.train.checkpoint_interval == 0 or at_end:
                    self.save()
                if self._stop_signal is not None and not at_end:
                    path = self.save()
                    name = signal.Signals(self._stop_signal).name
                    raise TrainingInterrupted(
                        f"{name} received: stopped after iteration {self.iteration}, checkpoint {path}. "
                        f"Resume with: sclseg train {self.out_dir / 'config.yaml'} --out {self.out_dir} --resume"
                    )
        finally:
            if progress is not None:
                progress.close()
            if self._writer is not None:
                self._writer.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        final = {
            "iteration": self.iteration,
            "method": cfg.method.name,
            "best": self.best,
            "last_eval": last_eval,
        }
        if self.main:
            (self.out_dir / "final.json").write_text(json.dumps(final, indent=2))
        return final
