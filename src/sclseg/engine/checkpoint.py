"""Atomic, code-free checkpoints: everything a run needs to continue exactly.

Files are written to a temporary name in the target folder, flushed and fsynced, then renamed
over the target (and the folder fsynced), so a crash or a pre-emption never leaves a
half-written checkpoint. Loading uses ``torch.load(weights_only=True)``: a checkpoint cannot
run code.

Two kinds of files:

* training checkpoints (``format: sclseg-checkpoint-1``): student, teacher, optimizer, lr
  schedule, scaler, iteration, data stream positions, every RNG state of every rank, the
  resolved config; ``sclseg train --resume`` continues them bit for bit.
* exported weights (``format: sclseg-weights-1``, :func:`export_weights`, ``sclseg export``):
  one network's ``state_dict`` plus what inference needs (config, class names and colours);
  ``sclseg predict`` / ``sclseg evaluate`` accept both kinds.
"""

from __future__ import annotations

import errno
import os
import random
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from sclseg.config import Config, config_from_dict
from sclseg.engine.errors import CheckpointWriteFailed, TrainingStopped
from sclseg.serialization import safe_load
from sclseg.models import create_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "WEIGHTS_FORMAT",
    "save_atomic",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
    "latest_checkpoint",
    "newest_readable_checkpoint",
    "list_checkpoints",
    "prune",
    "export_weights",
    "build_model_from_checkpoint",
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
        raise ValueError(f"{path}: not an sclseg checkpoint (format {found!r}); expected {CHECKPOINT_FORMAT!r} or {WEIGHTS_FORMAT!r}")
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


def export_weights(checkpoint: Union[str, Path], out: Union[str, Path], *, use_teacher: bool = True,
                   dtype: Optional[torch.dtype] = None) -> dict:
    """Write the weights-only inference file of a training checkpoint (or re-export weights).

    The file holds one network (the EMA teacher by default, the student on request) as a
    ``state_dict`` of tensors, the resolved config and the class names and colours, and nothing
    else: no optimizer, no RNG state. ``dtype`` (e.g. ``torch.float16``) casts floating tensors.
    Returns a summary of what was written.
    """
    ckpt = load_checkpoint(checkpoint)
    if ckpt["format"] == WEIGHTS_FORMAT:
        weights, role = ckpt["model"], ckpt.get("weights", "teacher")
    else:
        role = "teacher" if use_teacher else "student"
        weights = ckpt[role]
    if dtype is not None:
        weights = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in weights.items()}
    exported = {
        "format": WEIGHTS_FORMAT,
        "model": {k: v.detach().cpu().contiguous() for k, v in weights.items()},
        "weights": role,
        "config": ckpt["config"],
        "num_classes": ckpt["num_classes"],
        "class_names": ckpt["class_names"],
        "class_colors": ckpt["class_colors"],
        "iteration": ckpt.get("iteration"),
        "source": str(checkpoint),
    }
    save_atomic(exported, Path(out))
    return {"out": str(out), "weights": role, "iteration": exported["iteration"], "tensors": len(weights),
            "bytes": Path(out).stat().st_size}


def build_model_from_checkpoint(ckpt: dict, *, use_teacher: bool = True, source: Union[None, str, Path] = None
                                ) -> tuple[nn.Module, Config]:
    """The network stored in a checkpoint (teacher/EMA weights by default) and its config.

    Accepts training checkpoints and exported weights files (``sclseg export``).
    """
    where = f"{source}: " if source is not None else ""
    cfg = config_from_dict(ckpt["config"])
    model = create_model(cfg.model, ckpt["num_classes"], load_pretrained=False)
    if ckpt.get("format") == WEIGHTS_FORMAT or "model" in ckpt:
        held = ckpt.get("weights", "teacher")
        if not use_teacher and held != "student":
            raise ValueError(f"{where}this exported file holds the {held} weights only; the student's are in the "
                             "training checkpoint it was exported from (or an export of the student)")
        key = "model"
    else:
        key = "teacher" if use_teacher and "teacher" in ckpt else "student"
    try:
        model.load_state_dict(ckpt[key])
    except RuntimeError as exc:
        raise ValueError(
            f"{where}checkpoint weights do not fit model '{cfg.model.name}' with {ckpt['num_classes']} classes: {exc}"
        ) from exc
    return model, cfg
