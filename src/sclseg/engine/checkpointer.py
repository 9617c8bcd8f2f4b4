"""What a training checkpoint holds, and putting it back: the trainer's state in one place.

A checkpoint (``format: sclseg-checkpoint-1``) holds the student and teacher weights, the
optimizer, lr schedule and loss scaler, the iteration, the data stream positions, the best
evaluation so far, the step generator and the global RNG states of every rank, the resolved
config and the classes. Restoring it continues the run bit for bit (same world size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from sclseg.config import Config, config_to_dict
from sclseg.data import DataBundle
from sclseg.engine import distributed as dist
from sclseg.engine.checkpoint import CHECKPOINT_FORMAT, latest_checkpoint, prune, rng_state, save_atomic, set_rng_state
from sclseg.engine.errors import NonFiniteLoss
from sclseg.engine.seeding import rank_seed
from sclseg.methods import Method
from sclseg.teacher import unwrap

__all__ = ["TrainState", "Checkpointer"]

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


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


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
        now = _flatten(config_to_dict(self.cfg))
        changed = {k: (v, now.get(k)) for k, v in _flatten(ckpt.get("config", {})).items() if now.get(k) != v}
        if changed:
            self.log("resuming with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
