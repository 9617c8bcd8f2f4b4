"""``unimatch_v1`` and ``unimatch_v1_scl``: UniMatch V1 (Yang et al., 2023), as its ``unimatch.py``.

No EMA teacher: the online model labels. The unlabeled batch is split in two halves: the first
trains, the second fills the CutMix boxes (UniMatch's second unlabeled loader), labelled by the
model in eval mode. One pass over labeled and weak images in train mode, whose features the head
also reads with channel dropout (``Dropout2d(0.5)``, :func:`~sclseg.methods.weak_strong.channel_dropout`):
its clean weak-view predictions, detached, are the pseudo-labels, its perturbed ones learn them.
Two strong views, each with its own box, in one more pass.
``loss = (L_x + w (L_s1 / 4 + L_s2 / 4 + L_fp / 2)) / (1 + w)``, UniMatch's
``(L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2`` at full weight. The mean teacher is still kept for
evaluation; ``eval.use_teacher: false`` scores the online model, as UniMatch V1 does.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import Tensor

from sclseg.config import ConfigError
from sclseg.losses import masked_pseudo_label_loss
from sclseg.methods.base import Terms
from sclseg.methods.scl import EvalModeView
from sclseg.methods.weak_strong import WeakToStrong, channel_dropout
from sclseg.teacher import unwrap

__all__ = ["UniMatchV1", "UniMatchV1SCL"]


class UniMatchV1(WeakToStrong):
    """UniMatch V1: feature perturbation on the weak view and two strong views."""

    perturbs_features = True
    ema_warmup = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        size = self.cfg.data.unlabeled_batch_size
        if size < 4 or size % 2:
            raise ConfigError(f"data.unlabeled_batch_size: method '{self.config.name}' trains on half of the "
                              f"unlabeled batch and mixes in the other half; expected an even number >= 4, got {size}")

    def loss(self, labeled: dict, unlabeled: Optional[dict], weight: float) -> tuple[Tensor, Terms]:
        images, labels = labeled["image"], labeled["mask"]
        if unlabeled is None or weight <= 0.0:
            return self.labeled_only(labeled)
        (weak, source), (ignore, source_ignore) = unlabeled["image"].chunk(2), unlabeled["ignore"].chunk(2)
        with torch.no_grad():
            source_probs = EvalModeView(unwrap(self.student))(source).float().softmax(dim=1)
        count_x, count_u = images.shape[0], weak.shape[0]
        dropout = partial(channel_dropout, generator=self.generator)
        clean, perturbed = self.student(torch.cat([images, weak]), perturb=dropout).chunk(2)
        logits_x, logits_w = clean.split([count_x, count_u])
        probs = logits_w.detach().float().softmax(dim=1)
        conf, label = probs.max(dim=1)
        loss_fp = masked_pseudo_label_loss(perturbed[count_x:], label, conf >= self.config.threshold, ignore != 255)
        views, targets = zip(*(self.cutmix(self.augment(weak), self.augment(source), probs, source_probs, ignore,
                                           source_ignore) for _ in range(2)))
        logits_s = self.student(torch.cat(views)).chunk(2)
        loss_s = [self.unlabeled_loss(v, t) for v, t in zip(logits_s, targets)]
        loss_x = self.labeled_loss(logits_x, labels)
        loss_u = 0.25 * loss_s[0] + 0.25 * loss_s[1] + 0.5 * loss_fp
        loss = (loss_x + weight * loss_u) / (1.0 + weight)
        terms = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach(), "loss_fp": loss_fp.detach()}
        return self.finish(loss, terms, weight, logits_s, targets)


class UniMatchV1SCL(UniMatchV1):
    """UniMatch V1 plus ``w lambda_sc L_sc`` on each strong view (their mean)."""

    adds_scl = True
