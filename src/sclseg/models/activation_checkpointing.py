"""Activation checkpointing (``train.activation_checkpointing``) for any sclseg segmentation model.

A checkpointed unit keeps only its inputs during the forward pass and runs its forward a second
time in the backward pass to rebuild the activations its gradients need
(:func:`torch.utils.checkpoint.checkpoint`, non-reentrant). Peak memory then holds the unit
inputs plus the activations of one unit at a time, for about one more forward pass of compute.

Which modules are units, for a model with an ``encoder`` attribute (every model of
:func:`sclseg.models.create_model`):

* ``encoder``: the blocks of the encoder. A *stage* is an ``nn.Sequential`` or ``nn.ModuleList``
  whose children all have children of their own (residual blocks, transformer blocks); each of
  its children is a unit (WRN38 ``mod2``-``mod7`` blocks, ResNet ``layer1``-``layer4``
  bottlenecks, ViT ``blocks``). The search descends into modules that hold a stage further down
  (a wrapper around a timm model). A direct child of the encoder that holds no stage and is not
  a single layer is one unit as a whole (WRN38 ``mod1`` and ``bn_out``, a deep stem).
* ``all``: the encoder's units and every direct child of the model other than the encoder that
  is not a single layer (DeepLabV3+: ``aspp``, ``low_proj``, ``decoder``; a DPT head).

The units' ``forward`` is replaced on the instance, so the module tree, the parameter names and
the ``state_dict`` keys stay as they are, and a ``copy.deepcopy`` of the model (the EMA teacher)
rebinds the replaced forwards to the copy. Checkpointing acts only when autograd records
(``torch.is_grad_enabled()``): a forward under ``no_grad`` (the teacher, evaluation) is plain.

Random state: the CPU and CUDA generators are stashed before each unit and restored for the
recomputation (``preserve_rng_state=True``), so dropout drops the same channels twice.
BatchNorm: the recomputation runs in train mode with the same batch statistics, so its output
is the same; its running statistics are held fixed during the recomputation (momentum 0, the
batch counter restored), so they are updated once per forward, as without checkpointing.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = ["CHECKPOINT_MODES", "CheckpointMode", "apply_activation_checkpointing", "checkpointed_units"]

CheckpointMode = Literal["off", "encoder", "all"]
CHECKPOINT_MODES: tuple[str, ...] = ("off", "encoder", "all")


def _is_layer(module: nn.Module) -> bool:
    """A module without children (a convolution, a norm, an activation)."""
    return next(module.children(), None) is None


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _is_stage(module: nn.Module) -> bool:
    """A container of blocks: a Sequential/ModuleList whose children all have children."""
    return (
        isinstance(module, (nn.Sequential, nn.ModuleList))
        and len(module) > 0
        and all(not _is_layer(child) for child in module)
    )


def _holds_stage(module: nn.Module) -> bool:
    return any(_is_stage(m) for m in module.modules())


def _encoder_units(module: nn.Module, *, top: bool) -> list[nn.Module]:
    units: list[nn.Module] = []
    for child in module.children():
        if _is_layer(child) or not _has_parameters(child):
            continue
        if _is_stage(child):
            units.extend(block for block in child if _has_parameters(block))
        elif _holds_stage(child):
            units.extend(_encoder_units(child, top=False))
        elif top:
            units.append(child)
    return units


def checkpointed_units(model: nn.Module, mode: CheckpointMode) -> list[nn.Module]:
    """The modules :func:`apply_activation_checkpointing` wraps for ``mode`` (see the module doc)."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"train.activation_checkpointing: expected one of {', '.join(CHECKPOINT_MODES)}, got {mode!r}")
    if mode == "off":
        return []
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ValueError(
            f"train.activation_checkpointing={mode}: {type(model).__name__} has no 'encoder' module to checkpoint"
        )
    units = _encoder_units(encoder, top=True)
    if mode == "all":
        units.extend(
            child
            for name, child in model.named_children()
            if child is not encoder and not _is_layer(child) and _has_parameters(child)
        )
    if not units:
        raise ValueError(f"train.activation_checkpointing={mode}: found no block to checkpoint in "
                         f"{type(model).__name__}")
    return units


@contextmanager
def _running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers inside ``module`` normalise with batch statistics but leave their running
    statistics and batch counter as they were (train mode only; eval mode reads them anyway)."""
    saved: list[tuple[_BatchNorm, Any, torch.Tensor | None]] = []
    for bn in module.modules():
        if isinstance(bn, _BatchNorm) and bn.training and bn.track_running_stats:
            counter = None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone()
            saved.append((bn, bn.momentum, counter))
            bn.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for bn, momentum, counter in saved:
            bn.momentum = momentum
            if counter is not None:
                bn.num_batches_tracked.copy_(counter)


def _contexts(module: nn.Module) -> tuple[Any, Any]:
    """(forward context, recomputation context) for :func:`torch.utils.checkpoint.checkpoint`."""
    return nullcontext(), _running_stats_frozen(module)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward = type(self).forward
    if not torch.is_grad_enabled():
        return forward(self, *args, **kwargs)
    return checkpoint(
        forward,
        self,
        *args,
        use_reentrant=False,
        preserve_rng_state=True,
        context_fn=functools.partial(_contexts, self),
        **kwargs,
    )


def _is_checkpointed(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, types.MethodType) and forward.__func__ is _checkpointed_forward


def apply_activation_checkpointing(model: nn.Module, mode: CheckpointMode) -> nn.Module:
    """Checkpoint the units of ``model`` chosen by ``mode`` in place; return ``model``.

    ``mode`` is ``"off"`` (nothing changes), ``"encoder"`` or ``"all"``. Idempotent: a unit that
    is already checkpointed is left as it is. Apply it to the bare model, before wrapping it in
    DistributedDataParallel or ``torch.compile``. Raises ``ValueError`` for an unknown mode or a
    model without an ``encoder``.
    """
    for unit in checkpointed_units(model, mode):
        if not _is_checkpointed(unit):
            unit.forward = types.MethodType(_checkpointed_forward, unit)
    return model
