"""Resumable, rank-aware infinite streams of augmented batches.

Each stream walks seeded permutations of its dataset, epoch after epoch. Position ``g`` of
epoch ``e`` (``g`` counts over all ranks together) holds sample ``perm_e[g]`` augmented under
its own seed ``f(stream seed, e, g)``. Rank ``r`` of ``W`` takes positions ``r, r + W, ...``,
so with per-rank batch ``b`` the union of the ranks' ``k``-th batches is the ``k``-th batch of
one process with batch ``W * b``: same images, same augmentations. The per-sample seed draws the
geometry (in the dataset) and the photometric parameters (a row of ``batch["photometric"]``),
which :func:`batch_to_device` applies to the whole batch on the training device (for a CPU device
the loader applies them, ``augment_in_loader``). The batch at step ``k`` is a pure function of
the seed, ``k``, ``b`` and ``W``: it does not depend on the number of data workers, and a
resumed run continues exactly where the stopped one was.

An exception raised while loading a sample in a data worker is re-raised in the training
process with its own type and message first (the worker's traceback is attached as a note).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Callable, Literal, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sclseg.data.transforms import PhotometricAugment

__all__ = ["StreamSampler", "SeededAugmentation", "StepBatches", "Stream", "batch_to_device", "make_stream",
           "sample_seed"]

_MIX = 0x9E3779B97F4A7C15


def _seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 6364136223846793005 + part + _MIX) % (1 << 63)
    return value


def sample_seed(stream_seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of global ``position`` in ``epoch`` of a stream."""
    return _seed(stream_seed, epoch, position)


class StreamSampler(Sampler):
    """Yields ``(index, augmentation seed)`` forever; rank ``r`` of ``w`` takes every w-th position.

    Each epoch is a seeded permutation cut to ``w * (size // w)`` positions, so every rank gets
    the same number per epoch. ``start`` is the number of samples this rank has already
    consumed (for resuming).
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0,
                 name: str = "dataset") -> None:
        if size < 1:
            raise ValueError(f"the {name} split is empty: cannot train on a split without images")
        if size < world_size:
            raise ValueError(
                f"the {name} split has {size} image(s), fewer than the {world_size} training processes: "
                "every process needs at least one; add images or start fewer processes"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start
        self.per_rank = size // world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            generator = torch.Generator().manual_seed(_seed(self.seed, epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
            for position in range(offset, self.per_rank):
                g = position * self.world_size + self.rank
                yield order[g], sample_seed(self.seed, epoch, g)
            epoch, offset = epoch + 1, 0


class SeededAugmentation(Dataset):
    """Wraps a dataset so that ``ds[(index, seed)]`` augments under its own RNG seed.

    The torch, NumPy and Python RNGs are all seeded from ``seed`` for the duration of the call
    and restored afterwards, so the caller's random state is left untouched and the result
    does not depend on the process (main or worker) that loads the sample. With
    ``photometric``, the sample also carries its photometric parameters (``"photometric"``,
    drawn after the dataset's own augmentation).
    """

    def __init__(self, dataset: Dataset, photometric: Optional[PhotometricAugment] = None) -> None:
        self.dataset, self.photometric = dataset, photometric

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding
                random.seed(seed)
                np.random.seed(seed % (1 << 32))
                sample = self.dataset[index]
                if self.photometric is not None:
                    sample["photometric"] = self.photometric.draw()
                return sample
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _Collate:
    """Stacks samples into a batch; with ``photometric``, also augments its images with their
    parameter rows, which the batch then no longer carries (a picklable callable: workers run it)."""

    def __init__(self, photometric: Optional[PhotometricAugment] = None) -> None:
        self.photometric = photometric

    def __call__(self, samples: list[dict]) -> dict:
        batch = {"image": torch.stack([s["image"] for s in samples]), "name": [s["name"] for s in samples]}
        for key in ("mask", "ignore", "photometric"):
            if key in samples[0]:
                batch[key] = torch.stack([s[key] for s in samples])
        if self.photometric is not None:
            batch["image"] = self.photometric(batch["image"], batch.pop("photometric"))
        return batch


def _original_message(exc: BaseException) -> Optional[str]:
    """The message of the exception a DataLoader worker raised, cut from its re-raised text."""
    text = str(exc)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return None
    name = type(exc).__name__
    for marker in (f"\n{type(exc).__module__}.{type(exc).__qualname__}: ", f"\n{name}: ", f".{name}: "):
        at = text.rfind(marker)
        if at >= 0:
            return text[at + len(marker):].strip()
    return None


class Stream:
    """An infinite iterator of batches that knows how many batches it has handed out."""

    def __init__(self, loader: DataLoader, *, name: str, start_batch: int) -> None:
        self.loader, self.name, self.batches = loader, name, start_batch
        self._iterator = iter(loader)

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> dict:
        try:
            batch = next(self._iterator)
        except Exception as exc:
            raise self._surface(exc) from exc
        self.batches += 1
        return batch

    def _surface(self, exc: Exception) -> Exception:
        original = _original_message(exc)
        if original is not None:  # a worker raised: same type, its own message first
            try:
                clean = type(exc)(original)
            except Exception:
                return exc
            if hasattr(clean, "add_note"):
                clean.add_note(f"raised in a data worker of the {self.name} stream; {str(exc).splitlines()[0]}\n"
                               + "\n".join(str(exc).splitlines()[1:]))
            return clean
        text = str(exc)
        if isinstance(exc, RuntimeError) and "DataLoader worker" in text:  # killed, out of memory, ...
            return RuntimeError(
                f"a data worker of the {self.name} stream died without raising an exception ({text}); it may have "
                "been killed (out of memory?) or crashed in native code. Rerun with data.num_workers=0 to load "
                "the samples in the main process and see the error there"
            )
        return exc

    def close(self) -> None:
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def make_stream(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    photometric: Optional[PhotometricAugment] = None,
    augment_in_loader: bool = False,
    name: str = "dataset",
) -> Stream:
    """Infinite iterator of batches ``{"image": (B,3,H,W), "mask": (B,H,W)?, "ignore": (B,H,W)?,
    "photometric": (B,7)?, "name": [...]}`` (``mask``: labeled data; ``ignore``: unlabeled crops, 255
    where padded; ``photometric``: each sample's parameters for :func:`batch_to_device`).

    ``augment_in_loader`` applies ``photometric`` to each batch where it is assembled (in the
    workers, or in this process without them) instead, so that its batches carry augmented images
    and no rows: the same images, for a CPU training device, whose steps then do not wait for it.
    ``start_batch`` batches of this rank are skipped (already consumed by a resumed run).
    Building the stream does not touch the global RNGs.
    """
    if batch_size < 1:
        raise ValueError(f"the {name} batch size must be >= 1, got {batch_size}")
    sampler = StreamSampler(len(dataset), seed=seed, rank=rank, world_size=world_size, start=start_batch * batch_size,
                            name=name)
    loader = DataLoader(
        SeededAugmentation(dataset, photometric),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_Collate(photometric if augment_in_loader else None),
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        drop_last=True,
        # the loader draws its workers' base seed from this generator, not the global RNG
        generator=torch.Generator().manual_seed(_seed(seed, rank, 7)),
    )
    return Stream(loader, name=name, start_batch=start_batch)


def batch_to_device(batch: dict, device: torch.device, *, photometric: Optional[PhotometricAugment] = None,
                    channels_last: bool = False) -> dict:
    """A stream batch with its tensors on ``device``, as the training step takes it: the images
    augmented by ``photometric`` with the batch's own parameter rows (which it then no longer
    carries), then channels-last on request."""
    out = {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
           for key, value in batch.items() if key != "photometric"}
    if photometric is not None and "photometric" in batch:
        out["image"] = photometric(out["image"], batch["photometric"].to(device, non_blocking=True))
    if channels_last and out["image"].dim() == 4:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


Role = Literal["labeled", "unlabeled"]


class StepBatches:
    """Hands each training step its micro-batches, in step order.

    Step ``k`` takes its labeled micro-batches and, when it uses them, its unlabeled ones; each
    stream opens at the position of the step that first reads it.

    Args:
        open_stream: ``(role, step) -> Stream`` positioned at step ``step``'s first batch.
        next_batches: one step's micro-batches from a stream, on the training device.
    """

    def __init__(self, open_stream: Callable[[Role, int], Stream], next_batches: Callable[[Stream],
                                                                                          list[dict]]) -> None:
        self._open, self._next = open_stream, next_batches
        self.streams: dict[Role, Stream] = {}

    def take(self, step: int, *, unlabeled: bool) -> tuple[list[dict], Optional[list[dict]]]:
        """Step ``step``'s labeled micro-batches and its unlabeled ones (None when not ``unlabeled``)."""
        labeled = self._next(self._stream("labeled", step))
        return labeled, self._next(self._stream("unlabeled", step)) if unlabeled else None

    def close(self) -> None:
        """Close the streams (their data workers stop)."""
        for stream in self.streams.values():
            stream.close()
        self.streams.clear()

    def _stream(self, role: Role, step: int) -> Stream:
        if role not in self.streams:
            self.streams[role] = self._open(role, step)
        return self.streams[role]
