"""``unimatch_v2`` and ``unimatch_v2_scl``: UniMatch V2 (Yang et al., 2024), as its ``unimatch_v2.py``.

The EMA teacher labels the weak views; two strong views, each with its own augmentation and its own
CutMix box filled from the batch reversed; the labeled images in one student pass, both strong views
in another with complementary channel dropout on the features the head reads
(:func:`~sclseg.methods.weak_strong.complementary_dropout`);
``loss = (L_x + w (L_u1 + L_u2) / 2) / (1 + w)``, UniMatch V2's ``(L_x + (L_u1 + L_u2) / 2) / 2`` at
full weight.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import Tensor

from sclseg.methods.base import Terms
from sclseg.methods.weak_strong import WeakToStrong, complementary_dropout

__all__ = ["UniMatchV2", "UniMatchV2SCL"]


class UniMatchV2(WeakToStrong):
    """UniMatch V2: two strong views through one pass with complementary dropout."""

    perturbs_features = True

    def loss(self, labeled: dict, unlabeled: Optional[dict], weight: float) -> tuple[Tensor, Terms]:
        images, labels = labeled["image"], labeled["mask"]
        loss_x = self.labeled_loss(self.student(images), labels)
        if unlabeled is None or weight <= 0.0:
            return loss_x, {"loss": loss_x.detach(), "loss_x": loss_x.detach()}
        weak, ignore = unlabeled["image"], unlabeled["ignore"]
        with torch.no_grad():
            probs = self.mean_teacher.teacher(weak).float().softmax(dim=1)
        views, targets = [], []
        for _ in range(2):
            strong = self.augment(weak)
            mixed, target = self.cutmix(strong, strong.flip(0), probs, probs.flip(0), ignore, ignore.flip(0))
            views.append(mixed)
            targets.append(target)
        dropout = partial(complementary_dropout, generator=self.generator)
        logits = self.student(torch.cat(views), perturb=dropout).chunk(2)
        loss_u = sum(self.unlabeled_loss(v, t) for v, t in zip(logits, targets)) / 2.0
        loss = (loss_x + weight * loss_u) / (1.0 + weight)
        terms = {"loss_x": loss_x.detach(), "loss_u": loss_u.detach()}
        return self.finish(loss, terms, weight, logits, targets)


class UniMatchV2SCL(UniMatchV2):
    """UniMatch V2 plus ``w lambda_sc L_sc`` on each strong view (their mean)."""

    adds_scl = True
