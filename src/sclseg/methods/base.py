"""What every training method shares: one optimizer step around the method's own loss.

A method is a :class:`Method` subclass whose :meth:`Method.loss` is its recipe on one screen:
what the teacher sees, how views are made and mixed, which losses and weights. :meth:`Method.step`
is the rest of a step, the same for all of them: gradient accumulation over micro-batches (a
DDP-wrapped student skips the gradient all-reduce on all but the last), autocast, the fp16 loss
scaler, the optimizer and lr schedule steps and the EMA update of the mean teacher. The method
owns the step's random generator (CutMix boxes, SCL pairs, strong views), its autocast dtype and
its loss scaler; the checkpoint saves them.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sclseg.config import Config, MethodConfig
from sclseg.losses import ohem_cross_entropy, relaxed_boundary_loss
from sclseg.teacher import MeanTeacher

__all__ = ["AMP_DTYPES", "Method", "Terms"]

#: ``train.amp`` -> the autocast dtype of the forward passes (None: float32 throughout).
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: A step's loss terms, detached: ``{"loss", "loss_x", ...}``.
Terms = dict[str, Tensor]


class Method:
    """One semi-supervised method: its loss, inside the step every method shares.

    Subclasses set the class facts below and implement :meth:`loss`.

    Args:
        cfg: the run's config (``cfg.method`` holds the method's keys).
        student: the network that trains (maybe wrapped in DDP or ``torch.compile``).
        mean_teacher: the EMA of the student; evaluation reads it, and methods with a teacher use it.
        generator: the step's random generator, on the training device.
        ignore_index: the label value of pixels without a class.
    """

    #: Does the method read unlabeled images (False: labeled batches only)?
    needs_unlabeled: ClassVar[bool] = True
    #: Do the unlabeled crops get the data's colour jitter and blur (False: weak views, geometry only)?
    jitter_unlabeled: ClassVar[bool] = True
    #: ``method.ema_warmup`` when the config leaves it null.
    ema_warmup: ClassVar[bool] = False
    #: Does the method add the structured consistency loss (the ``_scl`` twins and ``scl``)?
    adds_scl: ClassVar[bool] = False
    #: Does the method perturb the features its network's head reads (needs ``encode``/``decode``)?
    perturbs_features: ClassVar[bool] = False

    def __init__(self, cfg: Config, student: nn.Module, mean_teacher: MeanTeacher,
                 optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, *,
                 generator: torch.Generator, ignore_index: int = 255) -> None:
        self.cfg, self.config = cfg, cfg.method
        self.student, self.mean_teacher = student, mean_teacher
        self.optimizer, self.scheduler = optimizer, scheduler
        self.generator, self.ignore_index = generator, ignore_index
        self.amp_dtype = AMP_DTYPES[cfg.train.amp]
        self.scaler = torch.amp.GradScaler(generator.device.type) if cfg.train.amp == "fp16" else None

    @classmethod
    def uses_ema_warmup(cls, config: MethodConfig) -> bool:
        """Whether the mean teacher follows ``min(1 - 1/(t+1), decay)`` (``method.ema_warmup``)."""
        return cls.ema_warmup if config.ema_warmup is None else config.ema_warmup

    # ------------------------------------------------------------------ the recipe
    def loss(self, labeled: dict, unlabeled: Optional[dict], weight: float) -> tuple[Tensor, Terms]:
        """The loss of one micro-batch and its detached terms (``"loss"`` among them).

        Args:
            labeled: ``{"image": (B, 3, H, W), "mask": (B, H, W)}`` on the training device.
            unlabeled: ``{"image": (U, 3, H, W), "ignore": (U, H, W)}`` (255: padding), or None
                when the step does not use unlabeled images (weight 0).
            weight: the unlabeled terms' weight at this step (:meth:`unlabeled_weight`).
        """
        raise NotImplementedError

    def labeled_only(self, labeled: dict) -> tuple[Tensor, Terms]:
        """The labeled loss alone: a step without unlabeled images (supervised, or before they start)."""
        loss_x = self.labeled_loss(self.student(labeled["image"]), labeled["mask"])
        return loss_x, {"loss": loss_x.detach(), "loss_x": loss_x.detach()}

    def unlabeled_weight(self, iteration: int) -> float:
        """Weight of the unlabeled terms at ``iteration``: 0 before ``method.unlabeled_start``, then a
        sigmoid ramp-up ``exp(-5 (1 - t)^2)`` over ``method.rampup_iters`` (Laine & Aila), then 1."""
        m = self.config
        if not self.needs_unlabeled or iteration < m.unlabeled_start:
            return 0.0
        if m.rampup_iters <= 0:
            return 1.0
        t = min(1.0, (iteration - m.unlabeled_start) / m.rampup_iters)
        return math.exp(-5.0 * (1.0 - t) ** 2)

    def labeled_loss(self, logits: Tensor, mask: Tensor) -> Tensor:
        """``method.labeled_loss`` of logits ``(B, K, H, W)`` against labels ``(B, H, W)``: cross-entropy
        with boundary relaxation (``relaxed``, window ``method.relax_window``), plain (``ce``) or OHEM."""
        m = self.config
        if m.labeled_loss == "ohem":
            return ohem_cross_entropy(logits, mask, threshold=m.ohem_threshold, min_kept=m.ohem_min_kept,
                                      ignore_index=self.ignore_index)
        if m.labeled_loss == "ce":
            return F.cross_entropy(logits.float(), mask, ignore_index=self.ignore_index)
        return relaxed_boundary_loss(logits, mask, window=m.relax_window, ignore_index=self.ignore_index)

    # ------------------------------------------------------------------ the shared step
    def step(self, labeled: list[dict], unlabeled: Optional[list[dict]], weight: float) -> Terms:
        """One optimizer step over micro-batches: forward, backward, optimizer, lr schedule, EMA.

        A list of batches (and of unlabeled batches) is one optimizer step with gradient
        accumulation: each micro-batch's loss is divided by their number. The loss and the
        returned terms are float32, averaged over the micro-batches.
        """
        umicro: list[Optional[dict]] = [None] * len(labeled) if unlabeled is None else list(unlabeled)
        if not labeled or len(umicro) != len(labeled):
            raise ValueError(f"step: {len(labeled)} labeled and {len(umicro)} unlabeled micro-batches; "
                             "expected as many of each (>= 1)")
        count = len(labeled)
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        no_sync = getattr(self.student, "no_sync", None)
        totals: Terms = {}
        for index, (batch, ubatch) in enumerate(zip(labeled, umicro)):
            sync = no_sync() if no_sync is not None and index < count - 1 else nullcontext()
            with sync:
                with self._autocast(batch["image"].device.type):
                    loss, terms = self.loss(batch, ubatch, weight)
                loss = loss.float()
                if count > 1:
                    loss = loss / count
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for key, value in terms.items():
                value = value.detach().float()
                totals[key] = value / count if key not in totals else totals[key] + value / count
        self._optimizer_step()
        self.mean_teacher.update(self.student)
        return totals

    def _autocast(self, device_type: str):
        return torch.autocast(device_type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        with warnings.catch_warnings():
            # a GradScaler skips steps with inf/NaN gradients (fp16 warm-up): the schedule still advances
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
