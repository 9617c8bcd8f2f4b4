"""Mean teacher: an exponential moving average of the student's weights (Tarvainen & Valpola)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["MeanTeacher", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel / ``torch.compile`` wrapper."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class MeanTeacher:
    """A frozen copy of the student updated as ``t = decay * t + (1 - decay) * s``.

    ``teacher`` is a deep copy of the student in eval mode with ``requires_grad=False``.
    :meth:`update` applies the EMA to every floating-point parameter and buffer in one fused
    pass and copies the others (e.g. BatchNorm's ``num_batches_tracked``).
    """

    def __init__(self, student: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.teacher = copy.deepcopy(unwrap(student))
        self.teacher.eval()
        self.teacher.requires_grad_(False)

    def _pairs(self, student: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        source = unwrap(student)
        t_state = dict(self.teacher.named_parameters()) | dict(self.teacher.named_buffers())
        s_state = dict(source.named_parameters()) | dict(source.named_buffers())
        if t_state.keys() != s_state.keys():
            missing = sorted(t_state.keys() ^ s_state.keys())[:5]
            raise ValueError(f"student and teacher have different tensors, e.g. {missing}")
        return [(t_state[name], s_state[name]) for name in t_state]

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step towards ``student`` (which may be wrapped in DDP)."""
        pairs = self._pairs(student)
        floats = [(t, s) for t, s in pairs if t.is_floating_point()]
        if floats:
            targets = [t for t, _ in floats]
            sources = [s.detach().to(dtype=t.dtype) for t, s in floats]
            torch._foreach_lerp_(targets, sources, 1.0 - self.decay)
        for t, s in pairs:
            if not t.is_floating_point():
                t.copy_(s)

    def __call__(self, *args, **kwargs):
        return self.teacher(*args, **kwargs)
