"""A second thread for work beside the training thread's, on a CPU with a core to spare.

Two pieces of a step run there without changing a bit of what the step computes:

* the EMA teacher's forward pass (``train.teacher_thread``), during the student's: the teacher's
  guess depends on the CutMix boxes and the teacher's weights, not on the student's pass of the
  same step, and the teacher (in eval mode) draws no random numbers;
* the next step's batches (``train.prefetch``), during this step's backward pass, optimizer step
  and EMA update. Loading a sample seeds the global RNGs and restores them afterwards
  (:class:`~sclseg.engine.stream.SeededAugmentation`); the training thread draws no random
  numbers in that part of the step, and waits for the batches before it leaves the step, so no
  draw of one thread can fall between the other's seeding and restoring. Activation
  checkpointing resets the global RNG in the backward pass to replay the forward pass, so it
  rules prefetching out.

The backward pass runs in native code that lets go of Python's interpreter lock, which the
loading (much of it Python) then takes; the teacher's pass is one network call.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Callable, Optional, TypeVar

import torch

from sclseg.config import MethodConfig

__all__ = ["SideThread", "wants_prefetch", "wants_teacher_thread"]

T = TypeVar("T")


class SideThread:
    """One thread beside the training thread; :meth:`submit` runs a function there.

    The function runs under the caller's torch thread count and, for ``device_type``, the caller's
    autocast setting (both are per thread in torch), so that it computes what it would compute in
    the caller's thread. :meth:`close` ends the thread; a later :meth:`submit` starts another.
    """

    def __init__(self) -> None:
        self._pool: Optional[ThreadPoolExecutor] = None

    def submit(self, fn: Callable[..., T], *args, device_type: Optional[str] = None) -> Future:
        """Run ``fn(*args)`` on the thread; ``device_type``: under the caller's autocast for that
        device type (None: without autocast)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sclseg-side")
        threads = torch.get_num_threads()
        autocast = None
        if device_type is not None:
            autocast = (device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type))

        def run() -> T:
            torch.set_num_threads(threads)
            context = nullcontext() if autocast is None else torch.autocast(autocast[0], dtype=autocast[1],
                                                                            enabled=autocast[2])
            with context:
                return fn(*args)

        return self._pool.submit(run)

    def close(self) -> None:
        """Wait for the submitted work and end the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _core_to_spare(device_type: str, threads: int, cores: int, processes: int) -> bool:
    """A CPU device whose ``cores`` hold two sets of ``threads`` torch threads per training process."""
    return device_type == "cpu" and cores >= 2 * threads * processes


def wants_teacher_thread(setting: str, method: MethodConfig, device_type: str, *, threads: int, cores: int,
                         processes: int = 1) -> bool:
    """Whether ``train.teacher_thread`` (``auto | on | off``) gives the EMA teacher the side thread.

    Never for ``supervised`` (no teacher) or ``method.teacher: student`` (the teacher is the
    student). ``auto``: on a CPU device whose ``cores`` hold two passes of ``threads`` torch
    threads for each of the ``processes`` training processes on the machine.
    """
    if setting == "off" or method.name == "supervised" or method.teacher != "ema":
        return False
    return setting == "on" or _core_to_spare(device_type, threads, cores, processes)


def wants_prefetch(setting: str, activation_checkpointing: str, device_type: str, *, threads: int, cores: int,
                   processes: int = 1) -> bool:
    """Whether ``train.prefetch`` (``auto | on | off``) loads the next step's batches on the side thread.

    Never with activation checkpointing (config validation refuses ``on`` with it). ``auto``: as
    for the teacher, on a CPU device with a core to spare for each training process.
    """
    if setting == "off" or activation_checkpointing != "off":
        return False
    return setting == "on" or _core_to_spare(device_type, threads, cores, processes)
