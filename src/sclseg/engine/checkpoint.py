"""Checkpoint files and the training state they carry: atomic, code-free, exact to continue.

Files are written to a temporary name in the target folder, flushed and fsynced, then renamed
over the target (and the folder fsynced), so a crash or a pre-emption never leaves a
half-written checkpoint. Loading uses ``torch.load(weights_only=True)``: a checkpoint cannot
run code.

Two kinds of files:

* training checkpoints (``format: sclseg-checkpoint-1``): student, teacher, optimizer, lr
  schedule, scaler, iteration, data stream positions, every RNG state of every rank, the
  resolved config; ``sclseg train --resume`` continues them bit for bit. :class:`Checkpointer`
  writes and restores them, :class:`TrainState` holds the loop's counters.
* exported weights (``format: sclseg-weights-1``, :func:`sclseg.export.export_weights`, ``sclseg export``):
  one network's ``state_dict`` plus what inference needs (config, class names and colours);
  ``sclseg predict`` / ``sclseg evaluate`` accept both kinds.
"""

from __future__ import annotations

import errno
import os
import random
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from sclseg.config import Config, config_to_dict, flatten_config
from sclseg.data import DataBundle
from sclseg.engine import distributed as dist
from sclseg.engine.errors import CheckpointWriteFailed, NonFiniteLoss, TrainingStopped
from sclseg.engine.seeding import rank_seed
from sclseg.methods import Method
from sclseg.serialization import safe_load
from sclseg.teacher import unwrap

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpointer",
    "TrainState",
    "WEIGHTS_FORMAT",
    "save_atomic",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "latest_checkpoint",
    "newest_readable_checkpoint",
    "list_checkpoints",
    "prune",
]

CHECKPOINT_FORMAT = "sclseg-checkpoint-1"
WEIGHTS_FORMAT = "sclseg-weights-1"
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj: Any, path: Union[str, Path]) -> None:
    """``torch.save`` to ``path`` atomically: temp file, flush + fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        # a stop (a second SIGTERM during the write) is no write fault: the files already there are whole
        if isinstance(exc, Exception) and not isinstance(exc, TrainingStopped):
            raise CheckpointWriteFailed(path, _os_error(exc) or exc, no_space=_no_space(exc)) from exc
        raise
    _fsync_dir(path.parent)


def _os_error(exc: BaseException) -> Optional[OSError]:
    """The OSError behind ``exc`` (torch's serializer reports a failed write as a RuntimeError)."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _no_space(exc: BaseException) -> bool:
    error = _os_error(exc)
    return error is not None and error.errno in (errno.ENOSPC, errno.EDQUOT)


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu", *, kind: Optional[str] = None) -> dict:
    """Load an sclseg checkpoint or exported weights file with ``weights_only=True``.

    ``kind="checkpoint"`` accepts only training checkpoints (what ``--resume`` needs),
    ``kind="weights"`` either kind (what inference needs). Every failure is a
    ``FileNotFoundError`` / ``ValueError`` naming the file and what was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = safe_load(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (CHECKPOINT_FORMAT, WEIGHTS_FORMAT):
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not an sclseg checkpoint (format {found!r}); expected {CHECKPOINT_FORMAT!r} or "
                         f"{WEIGHTS_FORMAT!r}")
    if kind == "checkpoint" and ckpt["format"] != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path}: exported weights ({ckpt['format']}) hold no optimizer or RNG state and cannot be resumed; "
            f"expected a training checkpoint ({CHECKPOINT_FORMAT}, a step_N.pt of the run folder)"
        )
    return ckpt


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA RNG states in types ``weights_only`` accepts."""
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only: touching the others would create a CUDA context on each
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.cpu().numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def list_checkpoints(directory: Union[str, Path]) -> list[tuple[int, Path]]:
    """``[(N, step_N.pt), ...]`` in ``directory``, sorted by N."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_FILE.match(p.name)))


def latest_checkpoint(directory: Union[str, Path]) -> Optional[Path]:
    """The ``step_N.pt`` with the largest N in ``directory``, or None."""
    steps = list_checkpoints(directory)
    return steps[-1][1] if steps else None


def _unreadable(path: Path) -> Optional[str]:
    """Why ``path`` is not a whole checkpoint file, or None when it is.

    ``torch.save`` writes a zip archive; each member's CRC is checked, which finds a truncated,
    empty or overwritten file without building its tensors.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        return f"not a whole checkpoint file ({exc})" if path.stat().st_size else "an empty file"
    return None if bad is None else f"damaged (member {bad} fails its checksum)"


def newest_readable_checkpoint(directory: Union[str, Path], log: Callable[[str], None]) -> Optional[Path]:
    """The newest ``step_N.pt`` in ``directory`` that is a whole file, or None.

    Each newer file that is damaged (cut short by a full disk, overwritten) is skipped with a
    line to ``log`` saying which and why, so a requeued job continues from the one before it.
    """
    for _, path in reversed(list_checkpoints(directory)):
        reason = _unreadable(path)
        if reason is None:
            return path
        log(f"warning: skipping {path}: {reason}")
    return None


def prune(directory: Union[str, Path], keep: int) -> None:
    """Delete all but the newest ``keep`` ``step_N.pt`` files (``best.pt`` is never touched)."""
    steps = list_checkpoints(directory)
    for _, path in steps[: max(0, len(steps) - max(1, keep))]:
        path.unlink(missing_ok=True)


_STREAMS = ("labeled", "unlabeled")


@dataclass
class TrainState:
    """The counters of a run. Stream positions are ``iteration * grad_accum + offset``; the offsets are 0
    except after a resume on another number of processes, which re-splits the streams."""

    iteration: int = 0
    best: dict = field(default_factory=lambda: {"miou": None, "iteration": None})
    stream_offsets: dict = field(default_factory=lambda: dict.fromkeys(_STREAMS, 0))

    def stream_position(self, role: str, grad_accum: int, step: Optional[int] = None) -> int:
        """Batches of stream ``role`` this rank has consumed (or skipped) before ``step`` (default: so far)."""
        return (self.iteration if step is None else step) * grad_accum + self.stream_offsets[role]


class Checkpointer:
    """Writes and restores the state of one run (collective under DDP: every rank calls it).

    Args:
        log: where warnings for the person go (rank 0).
    """

    def __init__(self, cfg: Config, folder: Path, data: DataBundle, method: Method, log: Callable[[str], None]) -> None:
        self.cfg, self.folder, self.data = cfg, Path(folder), data
        self.student, self.mean_teacher = method.student, method.mean_teacher
        self.optimizer, self.scheduler = method.optimizer, method.scheduler
        self.scaler, self.generator = method.scaler, method.generator
        self.log = log
        self.rank, self.world = dist.rank(), dist.world_size()
        self.saved_at: Optional[int] = None  # iteration of the newest step_N.pt this run wrote

    # ------------------------------------------------------------------ write
    def state_dict(self, state: TrainState) -> dict:
        """Everything the run needs to continue exactly (collective)."""
        per_rank = dist.all_gather_object({"generator": self.generator.get_state().cpu(), "rng": rng_state()})
        accum = self.cfg.train.grad_accum
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config_to_dict(self.cfg),
            "num_classes": self.data.num_classes,
            "class_names": [c.name for c in self.data.classes],
            "class_colors": [list(c.color) for c in self.data.classes],
            "iteration": state.iteration,
            "world_size": self.world,
            "student": unwrap(self.student).state_dict(),
            "teacher": self.mean_teacher.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "streams": {role: state.stream_position(role, accum) for role in _STREAMS},
            "generators": [r["generator"] for r in per_rank],
            "rng": [r["rng"] for r in per_rank],
            "best": dict(state.best),
        }

    def _weights_finite(self) -> bool:
        tensors = list(unwrap(self.student).parameters()) + list(self.mean_teacher.teacher.parameters())
        return bool(torch.stack([torch.isfinite(p).all() for p in tensors]).all())

    def save(self, state: TrainState, name: Optional[str] = None) -> Optional[Path]:
        """Write ``step_N.pt`` (or ``name``, e.g. ``best.pt``) from rank 0 and prune old step files.

        Never writes non-finite weights (raises :class:`NonFiniteLoss`), so every file is a good one.
        Returns the path written (None on other ranks).
        """
        if not self._weights_finite():
            raise NonFiniteLoss(step=state.iteration, checkpoint=latest_checkpoint(self.folder), what="weights")
        payload = self.state_dict(state)
        path = self.folder / (name or f"step_{state.iteration}.pt")
        if self.rank == 0:
            save_atomic(payload, path)
            if name is None:
                prune(self.folder, self.cfg.train.keep_last)
        if name is None:
            self.saved_at = state.iteration
        return path if self.rank == 0 else None

    # ------------------------------------------------------------------ read
    def restore(self, ckpt: dict, path: Path) -> TrainState:
        """Put ``ckpt`` (a loaded training checkpoint) back; returns the run's counters."""
        self._check_fits(ckpt, path)
        try:
            unwrap(self.student).load_state_dict(ckpt["student"])
            self.mean_teacher.teacher.load_state_dict(ckpt["teacher"])
        except RuntimeError as exc:
            raise ValueError(f"{path}: checkpoint weights do not fit model '{self.cfg.model.name}': {exc}") from exc
        self._restore_optimizer(ckpt, path)
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(iteration=int(ckpt["iteration"]), best=dict(ckpt["best"]))
        self.mean_teacher.updates = state.iteration  # one EMA update per step
        positions = dict(ckpt["streams"])
        saved_world = int(ckpt["world_size"])
        if saved_world == self.world and len(ckpt["generators"]) == self.world:
            self.generator.set_state(ckpt["generators"][self.rank].cpu())
            set_rng_state(ckpt["rng"][self.rank])
        else:
            positions = self._resplit(path, saved_world, state.iteration, positions)
        accum = self.cfg.train.grad_accum
        state.stream_offsets = {role: int(positions[role]) - state.iteration * accum for role in _STREAMS}
        self._log_changes(ckpt)
        return state

    def _restore_optimizer(self, ckpt: dict, path: Path) -> None:
        """Put the optimizer's state and the schedule's step back, under the config's settings.

        The moments (momentum, Adam's averages) and the step count come from the checkpoint; the
        settings (``optim.lr``, ``momentum``, ``weight_decay``, ``betas``, ``nesterov``,
        ``head_lr_multiplier``, ``poly_power``, ``train.iterations``) from the config, so a
        setting changed at the resume trains from the resumed step on: the lr of step k is the
        config's poly schedule at k. Unchanged settings give the same values, bit for bit.
        """
        saved_name = ckpt.get("config", {}).get("optim", {}).get("name", self.cfg.optim.name)
        if saved_name != self.cfg.optim.name:
            raise ValueError(f"{path}: checkpoint was trained with optim.name={saved_name!r}, the config asks for "
                             f"{self.cfg.optim.name!r}; an optimizer's state does not carry over to another one")
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as exc:
            raise ValueError(f"{path}: the optimizer state does not fit optim.head_lr_multiplier="
                             f"{self.cfg.optim.head_lr_multiplier} (it was saved with the encoder and head "
                             f"{'in one group' if len(ckpt['optimizer']['param_groups']) == 1 else 'apart'}): "
                             f"{exc}") from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        for group, setting in zip(self.optimizer.param_groups, settings):
            group.update(setting)
        self.scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        step = self.scheduler.last_epoch
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * factor(step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _check_fits(self, ckpt: dict, path: Path) -> None:
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

    def _resplit(self, path: Path, saved_world: int, iteration: int, positions: dict) -> dict:
        """Re-seed and re-split the streams for a different number of processes."""
        self.log(f"warning: {path} was written by {saved_world} process(es), this run has {self.world}: the "
                 "random streams are re-seeded and the data streams re-split, so the continuation is not bit "
                 "for bit what the original run would have done")
        seed = self.cfg.train.seed + iteration
        self.generator.manual_seed(rank_seed(seed, self.rank, "generator"))
        torch.manual_seed(rank_seed(seed, self.rank, "torch"))
        per_rank = self.cfg.data.batch_size * saved_world // self.world
        if per_rank != self.cfg.data.batch_size:
            self.log(f"warning: keep the global batch: data.batch_size={per_rank} on {self.world} processes "
                     f"equals {self.cfg.data.batch_size} on {saved_world}")
        return {k: v * saved_world // self.world for k, v in positions.items()}

    def _log_changes(self, ckpt: dict) -> None:
        now = flatten_config(config_to_dict(self.cfg))
        changed = {k: (v, now.get(k)) for k, v in flatten_config(ckpt.get("config", {})).items() if now.get(k) != v}
        if changed:
            listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())
            self.log(f"resuming with changed settings: {listed}")
