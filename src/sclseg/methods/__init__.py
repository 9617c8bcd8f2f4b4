"""The training methods, one module each, built by ``method.name`` from one registry.

=================  ==================================================================  =============
``method.name``    recipe                                                              teacher
=================  ==================================================================  =============
supervised         labeled loss only                                                   (EMA, eval)
cl                 mean teacher + N-box CutMix + pixel consistency (French et al.)     EMA
scl                cl + structured consistency loss (Kim et al., the paper)            EMA
fixmatch           weak-to-strong pseudo-labels, one strong view (UniMatch V2's code)  EMA, warm-up
unimatch_v1        two strong views + feature perturbation (Yang et al., 2023)         online model
unimatch_v2        two strong views, complementary dropout (Yang et al., 2024)         EMA, warm-up
``*_scl``          the method above plus ``lambda_sc`` x SCL on each strong view
=================  ==================================================================  =============
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from sclseg.config import Config, ConfigError
from sclseg.methods.base import AMP_DTYPES, Method, Terms
from sclseg.methods.fixmatch import FixMatch, FixMatchSCL
from sclseg.methods.scl import MeanTeacherCutMix, StructuredConsistency
from sclseg.methods.supervised import Supervised
from sclseg.methods.unimatch_v1 import UniMatchV1, UniMatchV1SCL
from sclseg.methods.unimatch_v2 import UniMatchV2, UniMatchV2SCL
from sclseg.teacher import MeanTeacher

__all__ = ["AMP_DTYPES", "METHODS", "Method", "Terms", "build_method", "method_class"]

#: ``method.name`` -> the method's class: the only place a method's name is written.
METHODS: dict[str, type[Method]] = {
    "supervised": Supervised,
    "cl": MeanTeacherCutMix,
    "scl": StructuredConsistency,
    "fixmatch": FixMatch,
    "fixmatch_scl": FixMatchSCL,
    "unimatch_v1": UniMatchV1,
    "unimatch_v1_scl": UniMatchV1SCL,
    "unimatch_v2": UniMatchV2,
    "unimatch_v2_scl": UniMatchV2SCL,
}


def method_class(name: str) -> type[Method]:
    """The class of ``method.name`` (a :class:`~sclseg.config.ConfigError` naming the choices if unknown)."""
    if name not in METHODS:
        raise ConfigError(f"method.name: expected one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def build_method(cfg: Config, student: nn.Module, mean_teacher: MeanTeacher, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, *, generator: torch.Generator,
                 ignore_index: int = 255, network: Optional[nn.Module] = None) -> Method:
    """The method of ``cfg.method.name`` around a run's pieces.

    ``network`` is the bare student (not wrapped), checked for what the method needs: a method that
    perturbs the features its head reads needs a network with ``encode`` and ``decode``.
    """
    cls = method_class(cfg.method.name)
    bare = network if network is not None else student
    if cls.perturbs_features and not (hasattr(bare, "encode") and hasattr(bare, "decode")):
        raise ConfigError(f"method.name: '{cfg.method.name}' perturbs the features the head reads, but model.name "
                          f"'{cfg.model.name}' does not expose them (encode/decode); choose another model or method")
    return cls(cfg, student, mean_teacher, optimizer, scheduler, generator=generator, ignore_index=ignore_index)
