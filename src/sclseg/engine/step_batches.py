"""The training loop's batches, step by step, from the labeled and unlabeled streams.

Step ``k`` takes its labeled micro-batches and, when it uses them, its unlabeled ones; each
stream opens at the position of the step that first reads it. :meth:`StepBatches.load_ahead`
loads a step's batches on a :class:`~sclseg.engine.side_thread.SideThread` while the step
before it trains; :meth:`StepBatches.take` then hands them over, or raises what loading them
raised, at the step that needs them, as loading them there would have.
"""

from __future__ import annotations

from concurrent.futures import Future, wait
from typing import Callable, Literal, Optional

from sclseg.engine.side_thread import SideThread
from sclseg.engine.stream import Stream

__all__ = ["StepBatches"]

Role = Literal["labeled", "unlabeled"]
#: A step's labeled micro-batches and its unlabeled ones (None: the step does not use them).
Batches = tuple[list[dict], Optional[list[dict]]]


class StepBatches:
    """Hands each step its micro-batches, in step order.

    Args:
        open_stream: ``(role, step) -> Stream`` positioned at step ``step``'s first batch.
        next_batches: one step's micro-batches from a stream, on the training device.
    """

    def __init__(self, open_stream: Callable[[Role, int], Stream], next_batches: Callable[[Stream], list[dict]]) -> None:
        self._open, self._next = open_stream, next_batches
        self.streams: dict[Role, Stream] = {}
        self._ahead: Optional[tuple[tuple[int, bool], Future]] = None  # (step, unlabeled), its loading

    def take(self, step: int, *, unlabeled: bool) -> Batches:
        """Step ``step``'s batches: the ones loaded ahead for it, else loaded now."""
        if self._ahead is None:
            return self._load(step, unlabeled)
        loaded_for, future = self._ahead
        self._ahead = None
        if loaded_for != (step, unlabeled):
            raise RuntimeError(f"the batches (step, unlabeled) {loaded_for} were loaded ahead, but {(step, unlabeled)} "
                               "are asked for")
        return future.result()

    def load_ahead(self, thread: SideThread, step: int, *, unlabeled: bool) -> Future:
        """Start loading step ``step``'s batches on ``thread``; :meth:`take` hands them over."""
        if self._ahead is not None:
            raise RuntimeError(f"the batches (step, unlabeled) {self._ahead[0]} are loaded ahead already")
        future = thread.submit(self._load, step, unlabeled)
        self._ahead = ((step, unlabeled), future)
        return future

    def close(self) -> None:
        """Wait for batches loaded ahead (and drop them), then close the streams."""
        if self._ahead is not None:
            wait([self._ahead[1]])
            self._ahead = None
        for stream in self.streams.values():
            stream.close()
        self.streams.clear()

    def _load(self, step: int, unlabeled: bool) -> Batches:
        labeled = self._next(self._stream("labeled", step))
        return labeled, self._next(self._stream("unlabeled", step)) if unlabeled else None

    def _stream(self, role: Role, step: int) -> Stream:
        if role not in self.streams:
            self.streams[role] = self._open(role, step)
        return self.streams[role]
