"""Reading ``.pth`` files without running code from them.

Every file sclseg opens (its own checkpoints, encoder weights, the published whole-network
checkpoints of NVIDIA and UniMatch) goes through :func:`safe_load`: ``torch.load`` with
``weights_only=True``, which unpickles tensors, containers and plain Python values only.
Published checkpoints also hold one NumPy float64 (NVIDIA's ``mean_iu``, UniMatch's
``previous_best``), which ``weights_only`` refuses by default; exactly the globals needed to
rebuild a NumPy scalar are allowed, under both module names (``numpy.core`` in files written with
NumPy 1.x, ``numpy._core`` with 2.x). Nothing else is ever allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

__all__ = ["UnsafeFileError", "safe_load", "NUMPY_SCALAR_GLOBALS"]


def _numpy_scalar_globals() -> list:
    """The callables and classes a pickled NumPy float64 scalar names."""
    multiarray = getattr(np, "_core", None) or np.core
    scalar = multiarray.multiarray.scalar
    allowed: list = [np.dtype, type(np.dtype(np.float64)), np.float64]
    # files name the reconstructor by the module it lived in when they were written
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.append((scalar, f"{module}.scalar"))
    return allowed


NUMPY_SCALAR_GLOBALS = _numpy_scalar_globals()


class UnsafeFileError(ValueError):
    """A file that cannot be read without running code from it (or that is not a PyTorch file)."""


def safe_load(path: Union[str, Path], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` that also accepts NumPy scalars.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeFileError: the file is truncated, not a PyTorch file, or asks to unpickle anything
            beyond tensors, containers, plain values and NumPy scalars (the message names what).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        text = str(exc)
        refused = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), None)
        if refused is not None:
            raise UnsafeFileError(
                f"{path}: refused to load: the file asks to rebuild an object beyond tensors and plain values "
                f"({refused}); unpickling it could run code from the file, which is unsafe"
            ) from exc
        detail = next((line.strip() for line in text.splitlines()[1:] if line.strip() and "error:" not in line
                       and "documentation" not in line), type(exc).__name__)
        raise UnsafeFileError(f"{path}: not a readable PyTorch file ({detail}; truncated or of another "
                              "format?)") from exc
