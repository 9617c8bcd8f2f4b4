"""Resumable, rank-aware infinite streams of augmented batches.

Each stream walks seeded permutations of its dataset, epoch after epoch, and gives every
sample its own augmentation seed derived from ``(stream seed, epoch, position)``. The batch
at step k is therefore a pure function of the seed and k: it does not depend on the number
of data workers, and a resumed run continues exactly where the stopped one was.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["StreamSampler", "SeededAugmentation", "make_stream"]

_MIX = 0x9E3779B97F4A7C15


def _seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 6364136223846793005 + part + _MIX) % (1 << 63)
    return value


class StreamSampler(Sampler):
    """Yields ``(index, augmentation seed)`` forever; rank ``r`` of ``w`` takes every w-th item.

    ``start`` is the number of samples this rank has already consumed (for resuming).
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        if size < 1:
            raise ValueError("cannot stream an empty dataset")
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start
        self.per_rank = max(1, size // world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            generator = torch.Generator().manual_seed(_seed(self.seed, epoch))
            order = torch.randperm(self.size, generator=generator)[self.rank :: self.world_size][: self.per_rank]
            for position in range(offset, self.per_rank):
                yield int(order[position]), _seed(self.seed, epoch, position, self.rank)
            epoch, offset = epoch + 1, 0


class SeededAugmentation(Dataset):
    """Wraps a dataset so that ``ds[(index, seed)]`` augments under its own RNG seed.

    The global torch RNG is forked, so the caller's random state is left untouched.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def _collate(samples: list[dict]) -> dict:
    batch = {"image": torch.stack([s["image"] for s in samples]), "name": [s["name"] for s in samples]}
    if "mask" in samples[0]:
        batch["mask"] = torch.stack([s["mask"] for s in samples])
    return batch


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
) -> Iterator[dict]:
    """Infinite iterator of batches ``{"image": (B,3,H,W), "mask": (B,H,W)?, "name": [...]}``."""
    sampler = StreamSampler(len(dataset), seed=seed, rank=rank, world_size=world_size, start=start_batch * batch_size)
    loader = DataLoader(
        SeededAugmentation(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        drop_last=True,
    )
    return iter(loader)
