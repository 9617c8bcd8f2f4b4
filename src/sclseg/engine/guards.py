"""The two things that stop a run between steps: a stop signal, and a non-finite loss.

Both are decided the same way on every rank (one small all-reduce), so that every process
stops after the same step.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable, Optional

import torch
from torch import Tensor

from sclseg.engine import distributed as dist

__all__ = ["StopSignals", "NonFiniteWatch"]

_NO_BAD = 1 << 62  # "no non-finite loss yet"


class StopSignals:
    """Catches SIGINT/SIGTERM while active (``with StopSignals(...):``): the first one asks the loop to
    stop after the current step; a second one calls ``on_second(signum)``, which raises."""

    def __init__(self, device: torch.device, on_second: Callable[[int], None]) -> None:
        self.device = device
        self.on_second = on_second
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        if self.signum is not None:
            self.on_second(signum)
        self.signum = signum

    def requested(self) -> bool:
        """Whether any rank received a stop signal (collective under DDP)."""
        if dist.world_size() == 1:
            return self.signum is not None
        flag = torch.tensor([self.signum or 0], dtype=torch.long, device=self.device)
        dist.all_reduce_max(flag)
        if self.signum is None and int(flag) > 0:
            self.signum = int(flag)
        return int(flag) > 0


class NonFiniteWatch:
    """Remembers the first step whose loss was NaN/Inf, on the device (no host sync per step)."""

    def __init__(self, device: torch.device) -> None:
        self._first_bad = torch.full((), _NO_BAD, dtype=torch.long, device=device)

    def update(self, loss: Tensor, step: int) -> None:
        """Record ``loss``, the loss of step ``step`` (1-based)."""
        bad_now = torch.where(torch.isfinite(loss), _NO_BAD, step)
        self._first_bad = torch.minimum(self._first_bad, bad_now)

    def first_bad_step(self) -> Optional[int]:
        """The first step with a non-finite loss on any rank, or None (one host sync; collective)."""
        bad = self._first_bad.clone()
        if dist.world_size() > 1:
            dist.all_reduce_min(bad)
        step = int(bad)
        return None if step == _NO_BAD else step
