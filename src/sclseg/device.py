"""What a device setting (``train.device``, ``--device``) means: one parser for every command.

Accepted: ``auto`` (this process's GPU when torch sees one, else the CPU), ``cpu``, ``cuda``,
``cuda:N`` and ``mps``.
"""

from __future__ import annotations

import re

import torch

from sclseg.config import ConfigError

__all__ = ["DEVICE_NAMES", "is_device_name", "resolve_device"]

DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def is_device_name(request: str) -> bool:
    """Whether ``request`` names a device (:data:`DEVICE_NAMES`); whether this machine has it is
    :func:`resolve_device`'s question, asked where the run starts."""
    return isinstance(request, str) and bool(_DEVICE.match(request))


def resolve_device(request: str, source: str, *, local_rank: int = 0) -> torch.device:
    """The device ``request`` names on this machine, for the process with ``local_rank`` on its node.

    ``auto`` and a bare ``cuda`` take GPU ``local_rank`` (one process per GPU under torchrun).
    A device this machine does not have is a :class:`~sclseg.config.ConfigError` naming ``source``.
    """
    if not is_device_name(request):
        raise ConfigError(f"{source} {request!r}: expected {DEVICE_NAMES}")
    if request == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(request)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{source} {request}: MPS is not available on this machine; use cpu (or auto)")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"{source} {request}: CUDA is not available on this machine (torch sees no GPU); "
                          "use cpu (or auto)")
    device = torch.device(f"cuda:{local_rank}") if device.index is None else device
    count = torch.cuda.device_count()
    if device.index >= count:
        raise ConfigError(f"{source} {request}: the process with LOCAL_RANK={local_rank} wants {device}, but this "
                          f"machine has {count} GPU(s) (cuda:0..cuda:{count - 1}); start at most one process per GPU")
    return device
