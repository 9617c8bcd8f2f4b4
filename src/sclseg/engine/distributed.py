"""torchrun / DDP helpers: process group set-up from the environment, rank queries, reductions.

A run started with ``torchrun --nproc-per-node K -m sclseg train CONFIG`` has ``WORLD_SIZE``
and ``LOCAL_RANK`` in its environment; NCCL is used on GPUs, Gloo on CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as td

__all__ = ["setup", "cleanup", "rank", "world_size", "is_main", "all_reduce_sum", "barrier"]


def setup(device_request: str) -> torch.device:
    """Initialise the process group when launched by torchrun; return this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_request == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_request)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={device_request!r} asks for CUDA but no GPU is available")
        torch.cuda.set_device(device)
    if world > 1 and not td.is_initialized():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def cleanup() -> None:
    if td.is_initialized():
        td.destroy_process_group()


def rank() -> int:
    return td.get_rank() if td.is_initialized() else 0


def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if td.is_initialized():
        td.all_reduce(tensor, op=td.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if td.is_initialized():
        td.barrier()
