"""``cl`` and ``scl``: the paper's mean teacher with CutMix (French et al.), and with SCL (Kim et al.).

One step (design section 1): N CutMix boxes per unlabeled pair ``u_a = u``, ``u_b = u`` rolled by
one; the teacher's softmax maps of ``u`` (one pass; ``u_b``'s are ``u_a``'s rolled) mixed as the
images are into the target; the student's maps of the mixed images. The loss is
``L_x + w (lambda_c L_c + lambda_sc L_sc)``: ``L_c`` the squared distance of the maps per pixel
(where the teacher is more confident than ``method.confidence``, when set), ``L_sc`` the
structured consistency over the regions of the last ``method.last_boxes`` boxes (``scl`` only).
``method.teacher: student`` guesses with the student itself in eval mode (paper Table 3).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from sclseg.cutmix import BoxMaskGenerator, mix
from sclseg.losses import consistency_loss, structured_consistency_loss
from sclseg.methods.base import Method, Terms
from sclseg.teacher import unwrap

__all__ = ["MeanTeacherCutMix", "StructuredConsistency"]


class MeanTeacherCutMix(Method):
    """``cl``: ``L_x + w lambda_c L_c`` on N-box CutMix pairs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.boxes = BoxMaskGenerator(self.config.n_boxes, self.config.box_area)

    def teacher_network(self) -> Callable[[Tensor], Tensor]:
        """Who guesses the labels: the EMA teacher, or the student seen in eval mode."""
        if self.config.teacher == "ema":
            return self.mean_teacher.teacher
        return EvalModeView(unwrap(self.student))

    def loss(self, labeled: dict, unlabeled: Optional[dict], weight: float) -> tuple[Tensor, Terms]:
        images, labels = labeled["image"], labeled["mask"]
        if unlabeled is None or weight <= 0.0:
            return self.labeled_only(labeled)
        u = unlabeled["image"]
        batch_u, _, height, width = u.shape
        owner = self.boxes(batch_u, height, width, self.generator, device=u.device)
        target = guessed_labels(self.teacher_network(), u, owner)
        mixed = mix(u, u.roll(1, dims=0), owner)
        if images.shape[1:] == mixed.shape[1:]:
            logits_x, logits_m = self.student(torch.cat([images, mixed])).split([images.shape[0], batch_u])
        else:
            logits_x, logits_m = self.student(images), self.student(mixed)
        probs_s = logits_m.float().softmax(dim=1)
        loss_x = self.labeled_loss(logits_x, labels)
        m = self.config
        confident = None if m.confidence is None else target.amax(dim=1) > m.confidence
        loss_c = consistency_loss(probs_s, target, confident)
        loss = loss_x + weight * m.lambda_c * loss_c
        terms = {"loss_x": loss_x.detach(), "loss_c": loss_c.detach()}
        if self.adds_scl:
            # a pixel the mask leaves out belongs to no region (owner -1), so it forms no pair
            regions = owner.masked_fill(~confident, -1) if m.sc_confident_only else owner
            loss_sc = structured_consistency_loss(probs_s, target, regions, n_boxes=m.n_boxes,
                                                  last_boxes=m.last_boxes, max_pairs=m.max_pairs,
                                                  generator=self.generator, sampling=m.pair_sampling)
            loss = loss + weight * m.lambda_sc * loss_sc
            terms["loss_sc"] = loss_sc.detach()
        terms["loss"] = loss.detach()
        return loss, terms


class StructuredConsistency(MeanTeacherCutMix):
    """``scl``: ``cl`` plus ``w lambda_sc L_sc``, the paper's method."""

    adds_scl = True


@torch.no_grad()
def guessed_labels(teacher: Callable[[Tensor], Tensor], unlabeled: Tensor, owner: Tensor) -> Tensor:
    """The teacher's soft labels of the mixed images ``(U, C, H, W)``, float32: one pass over the
    unlabeled images ``(U, 3, H, W)``, whose maps are mixed as the images are (u_b's are u_a's rolled)."""
    probs_a = teacher(unlabeled).float().softmax(dim=1)
    return mix(probs_a, probs_a.roll(1, dims=0), owner)


class EvalModeView:
    """The student as its own teacher (``method.teacher: student``): a forward pass in eval mode,
    so that BatchNorm uses its running statistics as the EMA teacher's does, then back to the mode
    it was in. Called under ``torch.no_grad``."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def __call__(self, images: Tensor) -> Tensor:
        training = self.network.training
        self.network.eval()
        try:
            return self.network(images)
        finally:
            self.network.train(training)
