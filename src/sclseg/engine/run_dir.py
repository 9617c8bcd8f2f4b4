"""The run folder and its metrics: ``config.yaml``, ``metrics.jsonl``, TensorBoard ``tb/``.

Only rank 0 writes; on other ranks every method is a no-op, so callers need not check.

One process at a time: rank 0 holds ``.sclseg.lock`` (an ``fcntl`` lock that the operating
system drops when the process ends, so a killed run never blocks the next one) from the moment
the folder is opened until :meth:`RunFolder.close`. A second run into the same folder is refused
with the process id of the holder. On opening, the temporary checkpoint files of writers that
were killed (``.step_N.pt.PID.tmp`` whose process is gone) are removed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Literal, Optional

import yaml

from sclseg.config import Config, config_to_dict
from sclseg.engine.checkpoint import list_checkpoints
from sclseg.engine.errors import RunFolderInUse, RunFolderLocked

__all__ = ["RunFolder", "RunLock", "json_safe", "remove_orphaned_temp_files"]

_RUN_FILES = ("metrics.jsonl", "final.json", "best.pt")
_TEMP_FILE = re.compile(r"^\..+\.(\d+)\.tmp$")  # save_atomic's ".<name>.<pid>.tmp"


def _process_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_orphaned_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files (``.NAME.PID.tmp``) in ``folder`` whose writing process is gone.

    A writer killed during a checkpoint leaves one behind, as large as a checkpoint. Returns the
    files removed.
    """
    removed = []
    for path in sorted(Path(folder).glob(".*.tmp")):
        match = _TEMP_FILE.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not _process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class RunLock:
    """An exclusive lock on a run folder, held by one process (re-entrant within it).

    The lock is an ``fcntl.flock`` on ``FOLDER/.sclseg.lock``, which holds the holder's process id
    for the message of a refused start. The operating system releases it when the process ends,
    however it ends, so a lock left by a dead process never blocks.
    """

    FILE = ".sclseg.lock"
    _held: dict = {}  # resolved folder -> [file descriptor, count], in this process

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._key = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunFolderLocked` naming the folder and the holder's process id."""
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        key = str(self.folder.resolve())
        if key in RunLock._held:
            RunLock._held[key][1] += 1
            self._key = key
            return
        fd = os.open(self.folder / self.FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunFolderLocked(self.folder, holder) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        RunLock._held[key] = [fd, 1]
        self._key = key

    def release(self) -> None:
        """Give the lock up (the last release of this process closes the lock file)."""
        if self._key is None:
            return
        entry = RunLock._held[self._key]
        entry[1] -= 1
        if entry[1] == 0:
            del RunLock._held[self._key]
            os.close(entry[0])  # closing the descriptor drops the flock
        self._key = None


def json_safe(value):
    """``value`` with every non-finite float replaced by None (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class RunFolder:
    """One run's folder: what a fresh run clears, what a resumed run keeps, and the metric records.

    Args:
        main: whether this process writes (rank 0); it locks the folder (:class:`RunLock`) until
            :meth:`close` and removes the temporary files of killed writers.
    """

    def __init__(self, path: Path, *, main: bool) -> None:
        self.path = Path(path)
        self.main = main
        self._writer = None
        self._lock = RunLock(self.path)
        if main:
            self._lock.acquire()
            for temp in remove_orphaned_temp_files(self.path):
                self.log(f"removed {temp}, a temporary file left by a killed process")

    # ------------------------------------------------------------------ set-up
    def start_fresh(self, cfg: Config, existing: Literal["replace", "error"]) -> None:
        """Make the folder, clear an earlier run's files (or refuse, ``existing="error"``), write the config."""
        if not self.main:
            return
        stale = [p for _, p in list_checkpoints(self.path)]
        if stale and existing == "error":
            raise RunFolderInUse(self.path, stale[-1])
        self.path.mkdir(parents=True, exist_ok=True)
        if stale or any((self.path / name).exists() for name in _RUN_FILES):
            self.log(f"fresh run in {self.path}: removing the earlier run's checkpoints and metrics")
            for path in stale:
                path.unlink(missing_ok=True)
            for name in _RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
        self.write_config(cfg)

    def continue_at(self, cfg: Config, iteration: int) -> None:
        """Prepare the folder of a run resumed at ``iteration``: drop metric records after it."""
        if not self.main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "config.yaml").exists():  # resuming another run's checkpoint here
            self.write_config(cfg)
        self._truncate_metrics(iteration)

    def write_config(self, cfg: Config) -> None:
        (self.path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

    def _truncate_metrics(self, iteration: int) -> None:
        """Keep the records up to ``iteration`` (the later ones are redone), once each."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return
        kept, seen = [], set()
        for record in self._records():
            key = (record.get("kind"), record.get("iteration"))
            if int(record.get("iteration", 0)) <= iteration and (key[0] == "resume" or key not in seen):
                kept.append(json.dumps(record))
                seen.add(key)
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def _records(self) -> list[dict]:
        """The records of ``metrics.jsonl``, without a line cut by a hard kill (empty if there is none)."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def eval_records(self) -> list[dict]:
        """The evaluation records of ``metrics.jsonl``."""
        return [r for r in self._records() if r.get("kind") == "eval"]

    # ------------------------------------------------------------------ records
    def open_tensorboard(self) -> None:
        """Also send numeric records to TensorBoard (``tb/``) when it is installed."""
        if not self.main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self._writer = SummaryWriter(str(self.path / "tb"))

    def close(self) -> None:
        """Close TensorBoard and give the folder's lock up."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._lock.release()

    def record(self, record: dict) -> None:
        """Append one JSON object to ``metrics.jsonl`` (and its numbers to TensorBoard)."""
        if not self.main:
            return
        with open(self.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(json_safe(record)) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self._writer.add_scalar(key, value, record["iteration"])

    def write_final(self, final: dict) -> None:
        if self.main:
            (self.path / "final.json").write_text(json.dumps(json_safe(final), indent=2))

    def log(self, message: str) -> None:
        """A line for the person watching (stderr, rank 0)."""
        if self.main:
            print(message, file=sys.stderr, flush=True)

    def read_final(self) -> Optional[dict]:
        path = self.path / "final.json"
        return json.loads(path.read_text()) if path.is_file() else None
