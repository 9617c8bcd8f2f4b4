"""Atomic, code-free checkpoints: everything a run needs to continue exactly.

Files are written to a temporary name, flushed and fsynced, then renamed over the target, so
a crash never leaves a half-written checkpoint. Loading uses ``torch.load(weights_only=True)``:
a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["save_atomic", "load_checkpoint", "rng_state", "set_rng_state", "latest_checkpoint", "prune"]

_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def save_atomic(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, foreign pickle, ...
        raise ValueError(f"{path}: not a readable sclseg checkpoint ({exc})") from exc


def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA RNG states in types ``weights_only`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(directory: Path) -> Optional[Path]:
    """The ``step_N.pt`` with the largest N in ``directory``, or None."""
    steps = []
    for p in Path(directory).glob("step_*.pt"):
        m = _STEP_FILE.match(p.name)
        if m:
            steps.append((int(m.group(1)), p))
    return max(steps)[1] if steps else None


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` ``step_N.pt`` files."""
    steps = sorted(
        (int(m.group(1)), p) for p in Path(directory).glob("step_*.pt") if (m := _STEP_FILE.match(p.name))
    )
    for _, path in steps[: max(0, len(steps) - keep)]:
        path.unlink(missing_ok=True)
