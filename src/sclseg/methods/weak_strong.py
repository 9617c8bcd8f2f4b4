"""The pieces FixMatch and UniMatch V1/V2 share: strong views, mixed pseudo-labels, feature dropout.

Weak and strong views come from one crop, so their pixels correspond: the weak view is the crop as
the data stream delivers it (geometry only: ``jitter_unlabeled`` is False for these methods), a
strong view is that crop with UniMatch's photometric augmentation, drawn per image on the training
device (colour jitter of brightness, contrast, saturation 0.5 and hue 0.25 with probability 0.8,
grayscale with probability 0.2, Gaussian blur with sigma in [0.1, 2] with probability 0.5;
:class:`~sclseg.data.transforms.PhotometricAugment`, whose jitter applies its four adjustments in a
fixed order where torchvision's shuffles them), then one CutMix box
(:class:`~sclseg.cutmix.OneBoxGenerator`) filled from another image. The teacher's weak-view maps,
its confidences and the crops' padding maps are mixed with the same box.

The SCL twins add ``w lambda_sc L_sc`` per strong view between the student's probabilities and the
teacher's mixed weak-view probabilities, over the two regions that view's box made (the box and
the rest of the image; padding belongs to neither).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from sclseg.cutmix import OneBoxGenerator, mix
from sclseg.data.transforms import PhotometricAugment, blur_kernel_size
from sclseg.losses import masked_pseudo_label_loss, structured_consistency_loss
from sclseg.methods.base import Method, Terms

__all__ = ["MixedTarget", "WeakToStrong", "complementary_dropout", "channel_dropout"]


class MixedTarget(NamedTuple):
    """The teacher's weak-view maps mixed as one strong view was: probabilities ``(U, C, H, W)``,
    the padding map ``(U, H, W)`` (255: padding) and the box owner map ``(U, H, W)`` (0: box, -1: rest)."""

    probs: Tensor
    ignore: Tensor
    owner: Tensor


class WeakToStrong(Method):
    """A method whose student learns the teacher's weak-view labels on strong views (FixMatch, UniMatch)."""

    jitter_unlabeled = False
    ema_warmup = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        crop = self.cfg.data.crop_size
        self.strong = PhotometricAugment(0.5, 0.5, blur_kernel_size(crop), jitter_prob=0.8, hue=0.25,
                                         grayscale_prob=0.2)
        self.box = OneBoxGenerator(prob=self.config.cutmix_prob)

    def augment(self, images: Tensor) -> Tensor:
        """Strong views ``(U, 3, H, W)`` of weak views ``(U, 3, H, W)``, each with its own parameters."""
        return self.strong(images, self.strong.draw_batch(images.shape[0], self.generator))

    def cutmix(self, images: Tensor, source: Tensor, probs: Tensor, source_probs: Tensor, ignore: Tensor,
               source_ignore: Tensor) -> tuple[Tensor, MixedTarget]:
        """``images (U, 3, H, W)`` with one box per image filled from ``source`` (same shape), and the
        teacher's target mixed alike: its probabilities ``(U, C, H, W)`` and the padding maps ``(U, H, W)``
        of the images and of the source."""
        owner = self.box(images.shape[0], images.shape[2], images.shape[3], self.generator)
        return mix(source, images, owner), MixedTarget(mix(source_probs, probs, owner),
                                                       mix(source_ignore, ignore, owner), owner)

    def unlabeled_loss(self, logits: Tensor, target: MixedTarget) -> Tensor:
        """:func:`~sclseg.losses.pseudo_label_loss` of the student's logits on a strong view."""
        conf, label = target.probs.max(dim=1)
        return masked_pseudo_label_loss(logits, label, conf >= self.config.threshold, target.ignore != 255)

    def finish(self, loss: Tensor, terms: Terms, weight: float, logits: Sequence[Tensor],
               targets: Sequence[MixedTarget]) -> tuple[Tensor, Terms]:
        """The method's loss plus, for an ``_scl`` twin, ``w lambda_sc`` times the mean ``L_sc`` of its
        strong views (``logits`` and ``targets``, one per view); the detached terms with ``"loss"``."""
        if self.adds_scl:
            loss_sc = sum(self.scl_loss(v, t) for v, t in zip(logits, targets)) / len(logits)
            loss = loss + weight * self.config.lambda_sc * loss_sc
            terms["loss_sc"] = loss_sc.detach()
        terms["loss"] = loss.detach()
        return loss, terms

    def scl_loss(self, logits: Tensor, target: MixedTarget) -> Tensor:
        """``L_sc`` between the student's probabilities on a strong view and the mixed target, over
        the box (region 0) and the rest of the image (region 1)."""
        m = self.config
        regions = torch.where(target.owner >= 0, 0, 1).masked_fill(target.ignore == 255, -1)
        return structured_consistency_loss(logits.float().softmax(dim=1), target.probs, regions, n_boxes=2,
                                           last_boxes=2, max_pairs=m.max_pairs, generator=self.generator,
                                           sampling=m.pair_sampling)


def _channel_mask_shape(feature: Tensor) -> tuple[int, ...]:
    """Where a per-sample, per-channel mask broadcasts: ``(B, 1, D)`` for tokens, ``(B, C, 1, 1)`` for maps."""
    if feature.dim() == 3:
        return (feature.shape[0], 1, feature.shape[2])
    return (feature.shape[0], feature.shape[1]) + (1,) * (feature.dim() - 2)


def channel_dropout(features: list[Tensor], generator: Optional[torch.Generator], p: float = 0.5) -> list[Tensor]:
    """UniMatch V1's feature perturbation: each feature followed by a copy with whole channels
    dropped per sample (``Dropout2d(p)``: kept ones scaled by ``1 / (1 - p)``); the batch doubles."""
    out = []
    for f in features:
        keep = torch.rand(_channel_mask_shape(f), generator=generator, device=f.device) >= p
        out.append(torch.cat([f, f * keep.to(f.dtype) / (1.0 - p)]))
    return out


def complementary_dropout(features: list[Tensor], generator: Optional[torch.Generator]) -> list[Tensor]:
    """UniMatch V2's complementary channel dropout on a batch of two views ``cat(s1, s2)`` (2U samples).

    Per pair (sample i of each view) and channel, ``m ~ 2 Binomial(0.5)`` for the first view and
    ``2 - m`` for the second, so every channel reaches the head from one of the two; ``int(U / 2)``
    pairs chosen at random keep every channel (``m = 1``). Features with the same channel count
    share one mask (the four ViT taps, as the reference); each other count gets its own.
    """
    masks: dict[int, Tensor] = {}
    out = []
    for f in features:
        shape = _channel_mask_shape(f)
        channels, pairs = shape[1] if f.dim() != 3 else shape[2], f.shape[0] // 2
        if channels not in masks:
            first = torch.bernoulli(torch.full((pairs, channels), 0.5, device=f.device), generator=generator) * 2.0
            kept = torch.randperm(pairs, generator=generator, device=f.device)[: int(pairs * 0.5)]
            first[kept] = 1.0
            masks[channels] = torch.cat([first, 2.0 - first])
        mask = masks[channels]
        out.append(f * mask.view(2 * pairs, 1, channels).to(f.dtype) if f.dim() == 3
                   else f * mask.view(2 * pairs, channels, *([1] * (f.dim() - 2))).to(f.dtype))
    return out
