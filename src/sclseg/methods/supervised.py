"""``supervised``: the labeled loss alone, the baseline every semi-supervised method is compared to."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from sclseg.methods.base import Method, Terms

__all__ = ["Supervised"]


class Supervised(Method):
    """``L_x`` on the labeled batch; the mean teacher is kept for evaluation only."""

    needs_unlabeled = False

    def loss(self, labeled: dict, unlabeled: Optional[dict], weight: float) -> tuple[Tensor, Terms]:
        return self.labeled_only(labeled)
