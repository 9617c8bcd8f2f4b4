"""One training step of the method (design section 1), separate from the loop.

:func:`compute_loss` builds ``L_x + w * (lambda_c * L_c + lambda_sc * L_sc)`` for a labeled
and an unlabeled batch; :func:`train_step` adds the optimizer, lr schedule and EMA update.
The methods are ``supervised`` (L_x only), ``cl`` (mean teacher + CutMix + L_c, French et
al.) and ``scl`` (+ L_sc, the paper).

Two parts of a step can run on a :class:`~sclseg.engine.side_thread.SideThread` meanwhile,
with the same results bit for bit: the teacher's guess, during the student's forward pass, and
work the caller starts just before the last backward pass (the trainer: the next step's batches).
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import Future, wait
from contextlib import nullcontext
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from sclseg.config import MethodConfig
from sclseg.cutmix import BoxMaskGenerator, mix
from sclseg.engine.side_thread import SideThread
from sclseg.losses import consistency_loss, relaxed_boundary_loss, structured_consistency_loss
from sclseg.teacher import MeanTeacher, unwrap

__all__ = ["AMP_DTYPES", "compute_loss", "train_step", "unlabeled_weight"]

#: ``train.amp`` -> the autocast dtype of the forward passes (None: float32 throughout).
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def unlabeled_weight(method: MethodConfig, iteration: int) -> float:
    """Weight of the unlabeled terms at ``iteration``: 0 before ``unlabeled_start``, then a
    sigmoid ramp-up ``exp(-5 (1 - t)^2)`` over ``rampup_iters`` (Laine & Aila), then 1."""
    if method.name == "supervised" or iteration < method.unlabeled_start:
        return 0.0
    if method.rampup_iters <= 0:
        return 1.0
    t = min(1.0, (iteration - method.unlabeled_start) / method.rampup_iters)
    return math.exp(-5.0 * (1.0 - t) ** 2)


@torch.no_grad()
def _guessed_labels(teacher: Callable[[Tensor], Tensor], unlabeled: Tensor, owner: Tensor) -> Tensor:
    """The teacher's soft labels of the mixed images ``(U, C, H, W)``, float32: one pass over the
    unlabeled images ``(U, 3, H, W)``, whose maps are mixed as the images are (u_b's are u_a's rolled)."""
    probs_a = teacher(unlabeled).float().softmax(dim=1)
    return mix(probs_a, probs_a.roll(1, dims=0), owner)


def compute_loss(
    student: nn.Module,
    teacher: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    unlabeled: Optional[Tensor],
    *,
    method: MethodConfig,
    mask_generator: BoxMaskGenerator,
    generator: Optional[torch.Generator] = None,
    weight: float = 1.0,
    ignore_index: int = 255,
    teacher_thread: Optional[SideThread] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The step's loss and its detached terms.

    Args:
        teacher: predicts the guessed labels (called under ``torch.no_grad``): the mean teacher's
            network, or the student seen in eval mode.
        images: labeled images ``(B, 3, H, W)``; labels ``(B, H, W)``.
        unlabeled: ``(U, 3, H', W')`` with ``U >= 2``, or None for supervised steps.
        weight: the unlabeled weight (ramp-up); 0 skips the unlabeled branch entirely.
        teacher_thread: guess the labels there, during the student's forward pass (the teacher
            must then be a network of its own, not the student).
    Returns:
        ``(loss, {"loss", "loss_x", "loss_c", "loss_sc"})`` (terms present as computed).
    """
    semi = method.name != "supervised" and unlabeled is not None and weight > 0.0
    if not semi:
        loss_x = relaxed_boundary_loss(student(images), labels, window=method.relax_window, ignore_index=ignore_index)
        return loss_x, {"loss": loss_x.detach(), "loss_x": loss_x.detach()}

    batch_u, _, height, width = unlabeled.shape
    owner = mask_generator(batch_u, height, width, generator, device=unlabeled.device)
    if teacher_thread is not None:
        guess = teacher_thread.submit(_guessed_labels, teacher, unlabeled, owner, device_type=unlabeled.device.type)
    else:
        target = _guessed_labels(teacher, unlabeled, owner)
    mixed = mix(unlabeled, unlabeled.roll(1, dims=0), owner)
    if images.shape[1:] == mixed.shape[1:]:
        logits_x, logits_m = student(torch.cat([images, mixed])).split([images.shape[0], batch_u])
    else:
        logits_x, logits_m = student(images), student(mixed)
    probs_s = logits_m.float().softmax(dim=1)

    loss_x = relaxed_boundary_loss(logits_x, labels, window=method.relax_window, ignore_index=ignore_index)
    if teacher_thread is not None:
        target = guess.result()
    confident = None if method.confidence is None else target.amax(dim=1) > method.confidence
    loss_c = consistency_loss(probs_s, target, confident)
    loss = loss_x + weight * method.lambda_c * loss_c
    terms = {"loss_x": loss_x.detach(), "loss_c": loss_c.detach()}
    if method.name == "scl":
        # a pixel the mask leaves out belongs to no region (owner -1), so it forms no pair
        regions = owner.masked_fill(~confident, -1) if method.sc_confident_only else owner
        loss_sc = structured_consistency_loss(
            probs_s,
            target,
            regions,
            n_boxes=method.n_boxes,
            last_boxes=method.last_boxes,
            max_pairs=method.max_pairs,
            generator=generator,
            sampling=method.pair_sampling,
        )
        loss = loss + weight * method.lambda_sc * loss_sc
        terms["loss_sc"] = loss_sc.detach()
    terms["loss"] = loss.detach()
    return loss, terms


def train_step(
    student: nn.Module,
    mean_teacher: MeanTeacher,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: list[dict],
    unlabeled_batches: Optional[list[dict]],
    *,
    method: MethodConfig,
    mask_generator: BoxMaskGenerator,
    generator: Optional[torch.Generator] = None,
    weight: float = 1.0,
    ignore_index: int = 255,
    amp_dtype: Optional[torch.dtype] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    teacher_thread: Optional[SideThread] = None,
    beside_backward: Optional[Callable[[], Future]] = None,
) -> dict[str, Tensor]:
    """Forward, backward, SGD step, lr schedule step and EMA update; returns detached terms.

    Batches are dicts from :mod:`sclseg.engine.stream`, already on the model's device. A list
    of batches (and of unlabeled batches) is one optimizer step with gradient accumulation:
    each micro-batch's loss is divided by their number, and a DDP-wrapped student skips the
    gradient all-reduce (``no_sync``) on all but the last. ``amp_dtype`` runs the forward
    passes under autocast; the loss and the returned terms are float32 (averaged over the
    micro-batches). ``scaler`` (fp16) scales the loss and skips steps with non-finite gradients.
    ``method.teacher`` chooses the guessed labels' network: the EMA (``"ema"``) or the student
    itself in eval mode (``"student"``); the EMA is updated either way, for evaluation.
    ``teacher_thread`` computes the EMA teacher's guesses there (see :mod:`sclseg.engine.side_thread`);
    it is not used with ``method.teacher: student``, whose teacher is the student itself.
    ``beside_backward`` is called once, just before the last micro-batch's backward pass, to start
    work on another thread; the step waits for the future it returns before it returns (without
    taking its result), so that the work ends inside the step's backward pass, optimizer step and
    EMA update, which draw no random numbers.
    """
    micro = list(batches)
    umicro: list[Optional[dict]] = [None] * len(micro) if unlabeled_batches is None else list(unlabeled_batches)
    if not micro or len(umicro) != len(micro):
        raise ValueError(f"train_step: {len(micro)} labeled and {len(umicro)} unlabeled micro-batches; "
                         "expected as many of each (>= 1)")
    count = len(micro)
    student.train()
    optimizer.zero_grad(set_to_none=True)
    device_type = micro[0]["image"].device.type
    no_sync = getattr(student, "no_sync", None)
    totals: dict[str, Tensor] = {}
    beside: Optional[Future] = None
    teacher = mean_teacher.teacher if method.teacher == "ema" else _EvalModeView(unwrap(student))
    if method.teacher != "ema":
        teacher_thread = None
    for index, (labeled, unlabeled) in enumerate(zip(micro, umicro)):
        sync = no_sync() if no_sync is not None and index < count - 1 else nullcontext()
        autocast = torch.autocast(device_type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        with sync:
            with autocast:
                loss, terms = compute_loss(student, teacher, labeled["image"], labeled["mask"],
                                           None if unlabeled is None else unlabeled["image"], method=method,
                                           mask_generator=mask_generator, generator=generator, weight=weight,
                                           ignore_index=ignore_index, teacher_thread=teacher_thread)
            loss = loss.float()
            if count > 1:
                loss = loss / count
            if beside_backward is not None and index == count - 1:
                beside = beside_backward()
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        for key, value in terms.items():
            value = value.detach().float()
            totals[key] = value / count if key not in totals else totals[key] + value / count
    _optimizer_step(optimizer, scheduler, scaler)
    mean_teacher.update(student)
    if beside is not None:
        wait([beside])
    return totals


class _EvalModeView:
    """The student as its own teacher (``method.teacher: student``): a forward pass in eval mode,
    so that BatchNorm uses its running statistics as the EMA teacher's does, then back to the mode
    it was in. ``compute_loss`` calls it under ``torch.no_grad``."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def __call__(self, images: Tensor) -> Tensor:
        training = self.network.training
        self.network.eval()
        try:
            return self.network(images)
        finally:
            self.network.train(training)


def _optimizer_step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    scaler: Optional[torch.amp.GradScaler]) -> None:
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    with warnings.catch_warnings():
        # a GradScaler skips steps with inf/NaN gradients (fp16 warm-up): the schedule still advances
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        scheduler.step()
