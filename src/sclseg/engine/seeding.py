"""Every seed a run derives from ``train.seed``, in one place.

* :func:`seed_process`: the global RNGs (dropout, ...) and the step generator (CutMix boxes,
  SCL pairs) of one process, different on every rank.
* :func:`stream_seed`: the seed of the labeled or unlabeled data stream, the same on every rank
  (the stream itself splits its positions over the ranks, see :mod:`sclseg.data.stream`).

Initial weights come from ``torch.manual_seed(train.seed)`` before the model is built, so that
every rank starts from the same network.
"""

from __future__ import annotations

import random
from typing import Literal

import numpy as np
import torch

__all__ = ["rank_seed", "seed_process", "stream_seed"]

_PURPOSES = {"generator": 1, "torch": 2, "python": 3, "numpy": 4}
_STREAMS = {"labeled": 1, "unlabeled": 2}


def rank_seed(seed: int, rank: int, purpose: Literal["generator", "torch", "python", "numpy"]) -> int:
    """A 62-bit seed for one purpose on one rank."""
    return (seed * 1_000_003 + rank * 7919 + _PURPOSES[purpose] * 104_729) % (1 << 62)


def seed_process(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """Seed torch's, Python's and NumPy's global RNGs for ``rank``; return its step generator on ``device``."""
    generator = torch.Generator(device=device).manual_seed(rank_seed(seed, rank, "generator"))
    torch.manual_seed(rank_seed(seed, rank, "torch"))
    random.seed(rank_seed(seed, rank, "python"))
    np.random.seed(rank_seed(seed, rank, "numpy") % (1 << 32))
    return generator


def stream_seed(seed: int, role: Literal["labeled", "unlabeled"]) -> int:
    """The seed of the ``role`` data stream of a run seeded ``seed``."""
    return seed * 2 + _STREAMS[role]
