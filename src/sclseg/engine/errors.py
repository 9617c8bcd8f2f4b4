"""Why a training run stopped early: exceptions that carry facts, not messages for a shell.

The engine raises these with the step, the signal and the newest checkpoint on disk; the
command line (:mod:`sclseg.cli`) turns them into a message, the command that resumes, and an
exit code.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Optional

from sclseg.config import ConfigError

__all__ = ["RunFolderInUse", "RunFolderLocked", "TrainingStopped", "TrainingInterrupted", "NonFiniteLoss",
           "EvaluationFailed", "CheckpointWriteFailed"]


class TrainingStopped(RuntimeError):
    """Base class: the run stopped after ``step`` steps; ``checkpoint`` is the newest one on disk (or None)."""

    def __init__(self, message: str, *, step: int, checkpoint: Optional[Path]) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


class TrainingInterrupted(TrainingStopped):
    """A signal (SIGINT, SIGTERM) stopped the run.

    ``immediate`` is False when the step was finished and ``checkpoint`` written at ``step``; True
    for a second signal, which stops at once without writing one.
    """

    def __init__(self, *, signum: int, step: int, checkpoint: Optional[Path], immediate: bool = False) -> None:
        name = signal.Signals(signum).name
        if immediate:
            text = f"{name} received twice: stopped at once during step {step + 1}, without writing a checkpoint"
        else:
            text = f"{name} received: stopped after step {step} (checkpoint {checkpoint})"
        super().__init__(text, step=step, checkpoint=checkpoint)
        self.signum = signum
        self.immediate = immediate


class NonFiniteLoss(TrainingStopped):
    """The loss (``what="loss"``) or the weights (``what="weights"``) became NaN or Inf at ``step``.

    No checkpoint is written after it, so ``checkpoint`` (the newest on disk) is a good one.
    """

    def __init__(self, *, step: int, checkpoint: Optional[Path], what: str = "loss") -> None:
        super().__init__(f"the {what} became NaN/Inf at step {step} and no checkpoint was written after it",
                         step=step, checkpoint=checkpoint)
        self.what = what


class EvaluationFailed(TrainingStopped):
    """The evaluation at ``step`` raised ``cause``; the step's ``checkpoint`` was written before it."""

    def __init__(self, *, step: int, checkpoint: Optional[Path], cause: BaseException) -> None:
        super().__init__(f"evaluation at step {step} failed: {cause}", step=step, checkpoint=checkpoint)
        self.cause = cause


class CheckpointWriteFailed(OSError):
    """Writing ``path`` failed (``no_space``: the file system is full); the files already there are intact."""

    def __init__(self, path: Path, cause: BaseException, *, no_space: bool) -> None:
        reason = f"no space left on device {_mount_point(path)}" if no_space else str(cause)
        super().__init__(f"cannot write {path}: {reason}; the checkpoints already in {path.parent} are intact")
        self.path = path
        self.no_space = no_space


def _mount_point(path: Path) -> Path:
    """The mount point of the file system that holds ``path``."""
    folder = path.absolute().parent
    while not os.path.ismount(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


class RunFolderInUse(ConfigError):
    """A fresh run was asked to write into ``folder``, which holds the checkpoints of another run."""

    def __init__(self, folder: Path, newest: Path) -> None:
        super().__init__(f"{folder} already holds checkpoints of a run ({newest.name})")
        self.folder = folder
        self.newest = newest


class RunFolderLocked(ConfigError):
    """Another process (``holder``, its process id) is running in ``folder``."""

    def __init__(self, folder: Path, holder: str) -> None:
        super().__init__(f"{folder} is in use by another sclseg run (process {holder}); wait for it to end, "
                         "or choose another --out")
        self.folder = folder
        self.holder = holder
