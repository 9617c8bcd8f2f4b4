"""The optimizer and its poly learning-rate schedule, as the trainer builds them.

``optim.name``:

- ``sgd`` (the paper: momentum 0.9, weight decay, optional Nesterov);
- ``adamw`` (UniMatch V2: ``torch.optim.AdamW`` with betas (0.9, 0.999) and weight decay 0.01 on
  every parameter, lr 5e-6 for the DINOv2 encoder on Cityscapes).

``optim.head_lr_multiplier`` scales the lr of every parameter outside ``model.encoder`` (the
decoder / head; UniMatch V2 uses 40 with DINOv2, UniMatch V1 1 on Cityscapes). Both groups follow
the same poly schedule ``lr_k = lr_0 * max(0, 1 - k / iterations) ** optim.poly_power``
(UniMatch: power 0.9; it sets step k's lr from step k - 1, one step behind this schedule).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Union

import torch
from torch import Tensor, nn

from sclseg.config import ConfigError, OptimConfig
from sclseg.teacher import unwrap

__all__ = ["build_optimizer", "parameter_groups"]


def parameter_groups(model: Union[nn.Module, Iterable[Tensor]], head_lr_multiplier: float, lr: float) -> list[dict]:
    """Optimizer parameter groups: one group, or the encoder's and the rest's with the multiplier.

    ``model`` may be wrapped (DDP, ``torch.compile``); the encoder is ``model.encoder``. With a
    multiplier of 1 all parameters form one group in ``model.parameters()`` order. A plain
    iterable of parameters is accepted for a multiplier of 1 only.
    """
    if not isinstance(model, nn.Module):
        if head_lr_multiplier != 1.0:
            raise ConfigError("optim.head_lr_multiplier needs the model (its encoder), not a list of parameters")
        return [{"params": list(model), "lr": lr}]
    if head_lr_multiplier == 1.0:
        return [{"params": list(model.parameters()), "lr": lr}]
    inner = unwrap(model)
    encoder = getattr(inner, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise ConfigError(f"optim.head_lr_multiplier: {type(inner).__name__} has no 'encoder' to tell the head from")
    encoder_ids = {id(p) for p in encoder.parameters()}
    backbone = [p for p in inner.parameters() if id(p) in encoder_ids]
    head = [p for p in inner.parameters() if id(p) not in encoder_ids]
    return [{"params": backbone, "lr": lr}, {"params": head, "lr": lr * head_lr_multiplier}]


def build_optimizer(model: Union[nn.Module, Iterable[Tensor]], cfg: OptimConfig, iterations: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer ``cfg.name`` over ``model``'s parameters and its poly schedule.

    The lr of each group at step ``k`` is its initial lr times ``max(0, 1 - k / iterations) **
    cfg.poly_power``; call the scheduler's ``step()`` once per optimizer step. Updates run as
    multi-tensor (``foreach``) operations on every device; on CPU, SGD's give the same weights, bit
    for bit, as the per-parameter loop (torch's CPU default).
    """
    groups = parameter_groups(model, cfg.head_lr_multiplier, cfg.lr)
    if cfg.name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov, foreach=True
        )
    elif cfg.name == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]),
                                      weight_decay=cfg.weight_decay, foreach=True)
    else:
        raise AssertionError(f"optim.name {cfg.name!r} passed config validation")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: max(0.0, 1.0 - it / iterations) ** cfg.poly_power
    )
    return optimizer, scheduler
