"""Mean teacher: an exponential moving average of the student's weights (Tarvainen & Valpola)."""

from __future__ import annotations

import copy
from typing import Optional

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
    """A frozen copy of the student updated as ``t = rate * t + (1 - rate) * s``.

    ``rate`` is ``decay``, or with ``warmup`` the rule of FixMatch and UniMatch V2's loops,
    ``min(1 - 1 / (n + 1), decay)`` where ``n`` counts the updates made so far from 0 (the first
    update copies the student). ``teacher`` is a deep copy of the student in eval mode with
    ``requires_grad=False``. :meth:`update` applies the EMA to every floating-point parameter and
    buffer in one fused pass and copies the others (e.g. BatchNorm's ``num_batches_tracked``).
    """

    def __init__(self, student: nn.Module, decay: float = 0.999, warmup: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.updates = 0  # EMA steps taken; a resumed run sets it to the steps already trained
        self.teacher = copy.deepcopy(unwrap(student))
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self._cache: Optional[tuple[nn.Module, tuple[list, list, list]]] = None

    def _pairs(self, student: nn.Module) -> tuple[list, list, list]:
        """``(teacher floats, student floats, [(teacher, student) others])``, built once per student.

        Parameters and buffers keep their identity across optimizer steps and in-place loads, so
        the lists are cached for the student module they were built from.
        """
        source = unwrap(student)
        if self._cache is not None and self._cache[0] is source:
            return self._cache[1]
        t_state = dict(self.teacher.named_parameters()) | dict(self.teacher.named_buffers())
        s_state = dict(source.named_parameters()) | dict(source.named_buffers())
        if t_state.keys() != s_state.keys():
            missing = sorted(t_state.keys() ^ s_state.keys())[:5]
            raise ValueError(f"student and teacher have different tensors, e.g. {missing}")
        floats = [name for name in t_state if t_state[name].is_floating_point()]
        others = [(t_state[n], s_state[n]) for n in t_state if not t_state[n].is_floating_point()]
        lists = ([t_state[n] for n in floats], [s_state[n] for n in floats], others)
        self._cache = (source, lists)
        return lists

    def rate(self) -> float:
        """The weight of the teacher's own value in the next update."""
        if self.warmup:
            return min(1.0 - 1.0 / (self.updates + 1), self.decay)
        return self.decay

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step towards ``student`` (which may be wrapped in DDP)."""
        targets, sources, others = self._pairs(student)
        if targets:
            sources = [s.detach().to(dtype=t.dtype) for t, s in zip(targets, sources)]
            torch._foreach_lerp_(targets, sources, 1.0 - self.rate())
        for t, s in others:
            t.copy_(s)
        self.updates += 1

    def __call__(self, *args, **kwargs):
        return self.teacher(*args, **kwargs)
