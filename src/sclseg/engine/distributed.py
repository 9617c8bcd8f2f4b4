"""torchrun / DDP helpers: process group set-up, rank queries, reductions, synchronized BatchNorm.

A run started with ``torchrun --nproc-per-node K -m sclseg train CONFIG`` has ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` in its environment; NCCL is used on GPUs, Gloo on CPU. See
docs/distributed.md.

BatchNorm statistics are synchronized across ranks: on GPUs with PyTorch's
:class:`torch.nn.SyncBatchNorm`, on CPU (which PyTorch's SyncBatchNorm does not support) with
:class:`CpuSyncBatchNorm`, the same computation written with differentiable all-reduces.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as td
from torch import Tensor, nn

from sclseg.device import resolve_device

__all__ = [
    "setup",
    "cleanup",
    "rank",
    "world_size",
    "is_main",
    "all_reduce_sum",
    "all_reduce_max",
    "all_reduce_min",
    "all_gather_object",
    "barrier",
    "CpuSyncBatchNorm",
    "convert_sync_batchnorm",
]


def setup(device_request: str) -> torch.device:
    """Initialise the process group when launched by torchrun; return this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_request, "train.device", local_rank=local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not td.is_initialized():
        if "MASTER_ADDR" not in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set: start multi-process runs with torchrun")
        if device.type == "cuda":
            td.init_process_group("nccl", device_id=device)
        else:
            td.init_process_group("gloo")
    return device


def cleanup() -> None:
    if td.is_initialized():
        td.destroy_process_group()


def rank() -> int:
    """This process's global rank (from the environment once the process group is gone)."""
    return td.get_rank() if td.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    if td.is_initialized():
        td.all_reduce(tensor, op=td.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: Tensor) -> Tensor:
    if td.is_initialized():
        td.all_reduce(tensor, op=td.ReduceOp.MAX)
    return tensor


def all_reduce_min(tensor: Tensor) -> Tensor:
    if td.is_initialized():
        td.all_reduce(tensor, op=td.ReduceOp.MIN)
    return tensor


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    if not td.is_initialized():
        return [obj]
    out: list = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if td.is_initialized():
        td.barrier()


# ------------------------------------------------------------------ synchronized BatchNorm
class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # noqa: ARG004
        out = tensor.clone()
        td.all_reduce(out, op=td.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ARG004
        out = grad.contiguous().clone()
        td.all_reduce(out, op=td.ReduceOp.SUM)
        return out


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (all ranks).

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d``. In training mode with a
    process group it computes the mean and the (biased) variance over every rank's batch with
    two all-reduces (mean first, then the centred squares, for accuracy); the backward pass
    all-reduces the matching gradients, so the result equals one process seeing the whole
    batch up to float rounding. Without a process group, or in eval mode, it is plain BatchNorm.
    Works on every device and backend (used with Gloo on CPU).
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        use_batch_stats = self.training or not self.track_running_stats
        if not (use_batch_stats and td.is_initialized() and td.get_world_size() > 1):
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        x = input.float()
        count = torch.tensor([x.numel() // channels], dtype=torch.float64, device=x.device)
        td.all_reduce(count, op=td.ReduceOp.SUM)
        n = float(count.item())
        if n <= 1:
            raise ValueError(f"expected more than 1 value per channel over all ranks when training, got {n:g}")
        mean = _AllReduceSum.apply(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: Optional[torch.device] = None) -> nn.Module:
    """Replace every BatchNorm of ``module`` with a synchronized one (in place where possible).

    CUDA: :class:`torch.nn.SyncBatchNorm`; any other device: :class:`CpuSyncBatchNorm`.
    Parameters and buffers are kept (the same tensors), so optimizers built later see them.
    """
    if device is not None and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (CpuSyncBatchNorm,
                                                                                       nn.SyncBatchNorm)):
        out = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    del module
    return out
