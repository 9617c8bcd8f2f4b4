"""The training loop: :class:`Trainer` builds a run's pieces and :meth:`Trainer.run` steps through it.

Each concern is a piece of its own, which the loop calls (docs/architecture.md):

* :class:`~sclseg.engine.run_dir.RunFolder`: ``config.yaml``, ``metrics.jsonl``, TensorBoard, ``final.json``;
* :class:`~sclseg.engine.checkpoint.Checkpointer`: ``step_N.pt`` / ``best.pt``, state and restore;
* :class:`~sclseg.engine.evaluation.Evaluator`: teacher and student on the eval split, the best score;
* :class:`~sclseg.engine.guards.StopSignals` and :class:`~sclseg.engine.guards.NonFiniteWatch`;
* :class:`~sclseg.data.stream.StepBatches`: each step's batches from the data streams;
* :class:`~sclseg.methods.Method` (``method.name``): one optimizer step of the method.

At a step that is due for both, the checkpoint is written before the evaluation, so a failing
evaluation loses nothing. The loop raises the exceptions of :mod:`sclseg.engine.errors`, which
carry the step and the newest checkpoint; the command line turns them into messages.

Distributed: under torchrun the student is wrapped in DDP with synchronized BatchNorm; the
teacher is a plain (unsynchronized) EMA copy in eval mode, identical on every rank. Only rank 0
writes files. See docs/distributed.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import torch
from torch import nn

from sclseg.config import Config, ConfigError
from sclseg.data import DataBundle, build_data
from sclseg.data.stream import StepBatches, Stream, batch_to_device, make_stream
from sclseg.data.transforms import build_photometric
from sclseg.engine import distributed as dist
from sclseg.engine.checkpoint import (
    Checkpointer,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    newest_readable_checkpoint,
)
from sclseg.engine.errors import EvaluationFailed, NonFiniteLoss, TrainingInterrupted, TrainingStopped
from sclseg.engine.evaluation import Evaluator
from sclseg.engine.guards import NonFiniteWatch, StopSignals
from sclseg.engine.monitor import TrainMonitor
from sclseg.engine.optim import build_optimizer
from sclseg.engine.run_dir import RunFolder
from sclseg.engine.seeding import seed_process, stream_seed
from sclseg.methods import build_method, method_class
from sclseg.models import create_model
from sclseg.models.activation_checkpointing import apply_activation_checkpointing
from sclseg.teacher import MeanTeacher, unwrap

__all__ = ["Trainer", "StepCallback"]

#: Called after every step with the trainer and the step's detached loss terms (e.g. a timer).
StepCallback = Callable[["Trainer", dict], None]


class Trainer:
    """Runs one training job described by a :class:`Config` into ``out_dir``.

    Args:
        resume: None/False (fresh run), True (newest ``step_N.pt`` in ``out_dir``, an error if
            there is none), ``"auto"`` (the newest if there is one, else a fresh run: for job
            scripts that are requeued) or a checkpoint path.
        data: pre-built datasets (default: built from ``cfg``).
        existing: what a fresh run does with the checkpoints of an earlier run in ``out_dir``:
            ``"replace"`` (delete them and the earlier metrics) or ``"error"``.
        eval_images: evaluate on only the first images of the eval split (the dry run uses 1).
    """

    def __init__(self, cfg: Config, out_dir: Union[str, Path], *, resume: Union[None, bool, str, Path] = None,
                 data: Optional[DataBundle] = None, show_progress: bool = True,
                 existing: Literal["replace", "error"] = "replace", eval_images: Optional[int] = None) -> None:
        self.cfg, t = cfg, cfg.train
        self.device = dist.setup(t.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.folder = RunFolder(Path(out_dir), main=self.rank == 0)
        self.show_progress = show_progress and self.rank == 0
        resume_path = self._resume_path(resume)

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        self.data = data if data is not None else build_data(cfg)
        if method_class(cfg.method.name).needs_unlabeled and self.data.unlabeled is None:
            raise ConfigError(f"method.name: '{cfg.method.name}' needs unlabeled images but the data has none")
        self.evaluator = Evaluator(cfg.eval, self.data.eval_splits, self.device, max_images=eval_images)
        self.student, self.mean_teacher = self._build_networks(load_pretrained=resume_path is None)
        self.optimizer, self.scheduler = build_optimizer(self.student, cfg.optim, t.iterations)
        self.photometric = build_photometric(cfg.data)  # colour jitter and blur, per batch on the device
        generator = seed_process(t.seed, self.rank, self.device)  # the method's: CutMix boxes, SCL pairs, views
        self.method = build_method(cfg, self.student, self.mean_teacher, self.optimizer, self.scheduler,
                                   generator=generator, ignore_index=self.data.ignore_index,
                                   network=unwrap(self.student))
        self.checkpointer = Checkpointer(cfg, self.folder.path, self.data, self.method, self.folder.log)
        self.state = TrainState()
        if resume_path is not None:
            self.state = self.checkpointer.restore(load_checkpoint(resume_path, kind="checkpoint"), resume_path)
            self.folder.continue_at(cfg, self.state.iteration)
            # the evaluation of the checkpoint's own step is recorded beside it, after it was written
            records = RunFolder(resume_path.parent, main=False).eval_records()
            self.evaluator.recall(self.state.best, records, self.state.iteration)
            self.state.best = self.evaluator.best
            self.folder.log(f"resumed from {resume_path} at step {self.state.iteration} of {t.iterations}")
            self.folder.record({"kind": "resume", "iteration": self.state.iteration, "checkpoint": str(resume_path)})
        else:
            self.folder.start_fresh(cfg, existing)
            dist.barrier()

    @property
    def out_dir(self) -> Path:
        return self.folder.path

    # ------------------------------------------------------------------ set-up
    def _build_networks(self, *, load_pretrained: bool) -> tuple[nn.Module, MeanTeacher]:
        t = self.cfg.train
        if t.amp == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"train.amp: bf16 is not supported by {torch.cuda.get_device_name(self.device)}; "
                              "use fp16 (with loss scaling) or off")
        model = create_model(self.cfg.model, self.data.num_classes, load_pretrained=load_pretrained).to(self.device)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        method = self.cfg.method
        # plain BatchNorm, eval mode
        mean_teacher = MeanTeacher(model, method.ema_decay, warmup=method_class(method.name).uses_ema_warmup(method))
        apply_activation_checkpointing(model, t.activation_checkpointing)  # the student only: it alone backprops
        if self.world > 1:
            if t.sync_bn:
                model = dist.convert_sync_batchnorm(model, self.device)
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if t.compile:
            model = torch.compile(model)
        return model, mean_teacher

    def _resume_path(self, resume: Union[None, bool, str, Path]) -> Optional[Path]:
        """The checkpoint to resume from (rank 0 decides, every rank gets its answer)."""
        if resume is None or resume is False:
            return None
        if resume is True or resume == "auto":
            found = newest_readable_checkpoint(self.out_dir, self.folder.log) if self.rank == 0 else None
            found = dist.all_gather_object(None if found is None else str(found))[0]
            if found is None and resume is True:
                raise FileNotFoundError(f"{self.out_dir}: no step_N.pt checkpoint to resume from; expected the "
                                        "folder of an earlier run, or a checkpoint file")
            return None if found is None else Path(found)
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: checkpoint to resume from not found")
        return path

    def _stream(self, role: Literal["labeled", "unlabeled"], step: Optional[int] = None) -> Stream:
        """The ``labeled`` or ``unlabeled`` stream, from the position of ``step`` in it (default: this run's)."""
        d = self.cfg.data
        dataset, batch_size = {"labeled": (self.data.labeled, d.batch_size),
                               "unlabeled": (self.data.unlabeled, d.unlabeled_batch_size)}[role]
        jitter = role == "labeled" or self.method.jitter_unlabeled
        return make_stream(dataset, batch_size, seed=stream_seed(self.cfg.train.seed, role),
                           start_batch=self.state.stream_position(role, self.cfg.train.grad_accum, step), name=role,
                           rank=self.rank, world_size=self.world, num_workers=d.num_workers,
                           pin_memory=self.device.type == "cuda", photometric=self.photometric if jitter else None,
                           augment_in_loader=self.device.type == "cpu")

    # ------------------------------------------------------------------ pieces the loop calls
    def step(self, batches: StepBatches) -> tuple[dict, float, float]:
        """One optimizer step of the method (``grad_accum`` micro-batches): its detached terms, lr and
        unlabeled weight.

        Step k always goes with unlabeled batches ``k * grad_accum ...``; a step that does not use
        them (weight 0: supervised, warm-up) skips them unloaded, so every method reaches
        ``method.unlabeled_start`` in the same state. The unlabeled stream opens at its first use.
        """
        k = self.state.iteration
        weight = self.method.unlabeled_weight(k)
        labeled, unlabeled = batches.take(k, unlabeled=weight > 0.0)
        lr = self.optimizer.param_groups[0]["lr"]
        return self.method.step(labeled, unlabeled, weight), lr, weight

    def _next_batches(self, stream: Stream) -> list[dict]:
        """The ``grad_accum`` micro-batches of one step, on the device, augmented (on a CPU device
        the streams' loaders have applied the colour jitter and blur: ``augment_in_loader``)."""
        return [batch_to_device(next(stream), self.device, photometric=self.photometric,
                                channels_last=self.cfg.train.channels_last)
                for _ in range(self.cfg.train.grad_accum)]

    def _check_finite(self, watch: NonFiniteWatch) -> None:
        step = watch.first_bad_step()
        if step is not None:
            last = latest_checkpoint(self.out_dir)
            self.folder.record({"kind": "nonfinite", "iteration": step, "last_good_checkpoint": last and str(last)})
            raise NonFiniteLoss(step=step, checkpoint=last)

    def save(self, watch: NonFiniteWatch, name: Optional[str] = None) -> Optional[Path]:
        """A checkpoint of the current state, never after a non-finite loss."""
        self._check_finite(watch)
        return self.checkpointer.save(self.state, name)

    def evaluate(self, watch: NonFiniteWatch) -> dict:
        """Evaluate; ``best.pt`` when the score improves. An error leaves this step's checkpoint on disk."""
        self._check_finite(watch)
        try:
            record = self.evaluator.evaluate(self.mean_teacher.teacher, unwrap(self.student), self.state.iteration)
        except TrainingStopped:
            raise
        except (RuntimeError, ValueError) as exc:  # a bad mask, an eval setting, out of memory, ...
            if self.checkpointer.saved_at != self.state.iteration:
                self.save(watch)
            raise EvaluationFailed(step=self.state.iteration,
                                   checkpoint=self.out_dir / f"step_{self.state.iteration}.pt",
                                   cause=exc) from exc
        if self.evaluator.improves(record):
            self.state.best = self.evaluator.best
            self.save(watch, "best.pt")
        self.folder.record({k: v for k, v in record.items() if not k.endswith("per_class_iou")} | {"kind": "eval"})
        return record

    # ------------------------------------------------------------------ the loop
    def run(self, *, evaluate: bool = True, until: Optional[int] = None,
            callbacks: Sequence[StepCallback] = ()) -> dict:
        """Train to ``train.iterations``; returns the final record (also in ``final.json``).

        ``evaluate=False`` skips the evaluation passes. ``until`` stops after that many steps (of the
        same schedule) with a checkpoint, as a pre-emption would; a resumed run continues from there.
        """
        t, state = self.cfg.train, self.state
        evaluate = evaluate and self.evaluator.dataset is not None  # data with no evaluation split
        if state.iteration >= t.iterations and self.folder.read_final() is not None:  # a finished run
            return self.folder.read_final()
        stop_at = t.iterations if until is None else min(int(until), t.iterations)
        watch = NonFiniteWatch(self.device)
        batches = StepBatches(self._stream, self._next_batches)
        monitor = TrainMonitor(total=t.iterations, initial=state.iteration, label=self.cfg.method.name,
                               progress=self.show_progress)
        signals = StopSignals(self.device, self._stop_at_once)
        last_eval = None
        self.folder.open_tensorboard()
        try:
            with signals:
                while state.iteration < stop_at:
                    terms, lr, weight = self.step(batches)
                    watch.update(terms["loss"], state.iteration + 1)
                    state.iteration += 1
                    monitor.add(terms)
                    for callback in callbacks:
                        callback(self, terms)
                    at_end, stopping = state.iteration >= t.iterations, signals.requested()
                    if state.iteration % t.log_interval == 0 or at_end or stopping or state.iteration == stop_at:
                        self._check_finite(watch)
                        self.folder.record(monitor.window_record(state.iteration, lr=lr, unlabeled_weight=weight))
                    if state.iteration % t.checkpoint_interval == 0 or at_end:
                        self.save(watch)
                    if evaluate and (state.iteration % t.eval_interval == 0 or at_end):
                        last_eval = self.evaluate(watch)
                        monitor.write(f"[{state.iteration}] {last_eval['split']} mIoU teacher "
                                      f"{last_eval['teacher_miou']:.2f} student {last_eval['student_miou']:.2f} "
                                      f"({last_eval['eval_mode']})")
                    if (stopping and not at_end) or state.iteration == stop_at < t.iterations:
                        if self.checkpointer.saved_at != state.iteration:
                            self.save(watch)
                        if stopping:
                            raise TrainingInterrupted(signum=signals.signum, step=state.iteration,
                                                      checkpoint=self.out_dir / f"step_{state.iteration}.pt")
        finally:
            batches.close()
            monitor.close()
            self.folder.close()
        if state.iteration < t.iterations:  # stopped by `until`
            return {"iteration": state.iteration, "stopped": True, "method": self.cfg.method.name,
                    "checkpoint": str(self.out_dir / f"step_{state.iteration}.pt"), "best": state.best}
        final = {"iteration": state.iteration, "method": self.cfg.method.name, "world_size": self.world,
                 "best": state.best, "last_eval": last_eval}
        self.folder.write_final(final)
        return final

    def _stop_at_once(self, signum: int) -> None:
        raise TrainingInterrupted(signum=signum, step=self.state.iteration, checkpoint=latest_checkpoint(self.out_dir),
                                  immediate=True)
