"""Loss averages over the logging window, and the progress bar."""

from __future__ import annotations

import time

from torch import Tensor

__all__ = ["TrainMonitor"]


class TrainMonitor:
    """Sums the step terms on the device (no host sync per step) and turns a window into a record.

    Args:
        progress: show a tqdm bar (rank 0, interactive runs).
    """

    def __init__(self, *, total: int, initial: int, label: str, progress: bool) -> None:
        self._sums: dict[str, Tensor] = {}
        self._steps = 0
        self._start = time.perf_counter()
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=label, dynamic_ncols=True)

    def add(self, terms: dict[str, Tensor]) -> None:
        for key, value in terms.items():
            self._sums[key] = self._sums.get(key, 0.0) + value.detach().float()
        self._steps += 1
        if self._bar is not None:
            self._bar.update(1)

    def window_record(self, iteration: int, **extra) -> dict:
        """The mean terms since the last call (one host sync) and the step rate; starts a new window."""
        elapsed = time.perf_counter() - self._start
        record = {k: float(v) / self._steps for k, v in self._sums.items()}
        record |= {"iteration": iteration, **extra, "it_per_s": self._steps / max(elapsed, 1e-9), "kind": "train"}
        if self._bar is not None:
            shown = {k: f"{v:.3f}" for k, v in record.items() if k.startswith("loss")}
            self._bar.set_postfix(shown | {"lr": f"{record.get('lr', 0.0):.2e}"})
        self._sums, self._steps, self._start = {}, 0, time.perf_counter()
        return record

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
