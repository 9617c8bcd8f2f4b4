"""``fixmatch`` and ``fixmatch_scl``: FixMatch with an EMA teacher, as UniMatch V2's ``fixmatch.py``.

The EMA teacher (``min(1 - 1/(t+1), method.ema_decay)``) labels the weak views; one strong view per
image, with one CutMix box filled from the batch reversed; labeled and strong images in one student
pass; ``loss = (L_x + w L_u) / (1 + w)``, which is UniMatch's ``(L_x + L_u) / 2`` at full weight
(``w = 1``) and the labeled loss alone before the unlabeled terms start.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from sclseg.methods.base import Terms
from sclseg.methods.weak_strong import WeakToStrong

__all__ = ["FixMatch", "FixMatchSCL"]


class FixMatch(WeakToStrong):
    """FixMatch: hard, confidence-masked pseudo-labels of the weak view on one strong view."""

    def loss(self, labeled: dict, unlabeled: Optional[dict], weight: float) -> tuple[Tensor, Terms]:
        images, labels = labeled["image"], labeled["mask"]
        if unlabeled is None or weight <= 0.0:
            return self.labeled_only(labeled)
        weak, ignore = unlabeled["image"], unlabeled["ignore"]
        with torch.no_grad():
            probs = self.mean_teacher.teacher(weak).float().softmax(dim=1)
        strong = self.augment(weak)
        mixed, target = self.cutmix(strong, strong.flip(0), probs, probs.flip(0), ignore, ignore.flip(0))
        logits_x, logits_s = self.student(torch.cat([images, mixed])).split([images.shape[0], weak.shape[0]])
        loss_x = self.labeled_loss(logits_x, labels)
        loss_u = self.unlabeled_loss(logits_s, target)
        loss = (loss_x + weight * loss_u) / (1.0 + weight)
        return self.finish(loss, {"loss_x": loss_x.detach(), "loss_u": loss_u.detach()}, weight, [logits_s], [target])


class FixMatchSCL(FixMatch):
    """FixMatch plus ``w lambda_sc L_sc`` on its strong view."""

    adds_scl = True
