"""The model builder: one function from a :class:`~sclseg.config.ModelConfig` to a network.

Every model maps images ``(B, 3, H, W)`` in ``[0, 1]`` to logits ``(B, K, H, W)``.

=========================  ==========================================  ===================
``model.name``             encoder                                     low / high stride
=========================  ==========================================  ===================
compact                    small residual CNN (trains on a CPU)        2 / 8 or 16
deeplabv3plus_wrn38        Wider ResNet-38 A2, dilated (the paper's)   2 / 8 or 16
deeplabv3plus_resnet50     torchvision ResNet-50, dilated              4 / 8 or 16
deeplabv3plus_resnet101    torchvision ResNet-101, dilated             4 / 8 or 16
=========================  ==========================================  ===================

``model.pretrained`` names a local file of encoder weights (see :func:`load_encoder_weights`);
nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
from torch import nn

from sclseg.config import ConfigError, ModelConfig
from sclseg.models.compact import CompactEncoder
from sclseg.models.deeplab import DeepLabV3Plus
from sclseg.models.resnet import ResNetEncoder
from sclseg.models.wrn38 import WiderResNet38

__all__ = ["create_model", "load_encoder_weights", "PretrainedReport", "MODEL_NAMES"]

MODEL_NAMES = ("compact", "deeplabv3plus_wrn38", "deeplabv3plus_resnet50", "deeplabv3plus_resnet101")

#: ASPP dilation rates of the paper-scale models (Chen et al.; Zhu et al.), by output stride.
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}

_log = logging.getLogger(__name__)


def create_model(cfg: ModelConfig, num_classes: int, *, load_pretrained: bool = True) -> nn.Module:
    """Build the network named by ``cfg.name`` for ``num_classes`` classes.

    With ``cfg.pretrained`` set (and ``load_pretrained``), the encoder's weights are read from that
    local file. Pass ``load_pretrained=False`` when full weights follow anyway (restoring a
    checkpoint), so that the encoder file need not exist on the machine.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if cfg.output_stride not in (8, 16):
        raise ConfigError(f"model.output_stride must be 8 or 16, got {cfg.output_stride}")
    name = cfg.name
    if name == "compact":
        w = cfg.width
        encoder = CompactEncoder(w, cfg.output_stride)
        rates = (2, 4, 6) if cfg.output_stride == 8 else (1, 2, 3)
        model = DeepLabV3Plus(
            encoder, num_classes, aspp_rates=rates, aspp_channels=4 * w, low_level_channels=w // 2, decoder_channels=2 * w
        )
    elif name == "deeplabv3plus_wrn38":
        # Zhu et al.'s head has no dropout after the ASPP projection (the trunk drops channels in mod6-7).
        model = DeepLabV3Plus(
            WiderResNet38(cfg.output_stride), num_classes, aspp_rates=ASPP_RATES[cfg.output_stride], dropout=0.0
        )
    elif name in ("deeplabv3plus_resnet50", "deeplabv3plus_resnet101"):
        depth = 50 if name.endswith("50") else 101
        model = DeepLabV3Plus(
            ResNetEncoder(depth, cfg.output_stride), num_classes, aspp_rates=ASPP_RATES[cfg.output_stride]
        )
    else:
        raise ConfigError(f"model.name '{name}' is unknown; available: {', '.join(MODEL_NAMES)}")
    if cfg.pretrained and load_pretrained:
        model.pretrained_report = load_encoder_weights(model.encoder, cfg.pretrained)
    return model


# --------------------------------------------------------------------------- pretrained weights

# Where checkpoints keep their weights: the common containers, then sclseg's own checkpoints
# (the EMA teacher, the weights evaluation uses, before the student).
_CONTAINER_KEYS = ("state_dict", "model", "teacher", "student")
_STRIP_PREFIXES = ("module.", "encoder.")


@dataclass
class PretrainedReport:
    """What :func:`load_encoder_weights` did with a weights file."""

    path: str
    loaded: list[str] = field(default_factory=list)  # encoder tensors taken from the file
    missing: list[str] = field(default_factory=list)  # encoder tensors the file lacks (left as initialised)
    unexpected: list[str] = field(default_factory=list)  # file tensors the encoder has no place for (ignored)

    def summary(self, limit: int = 8) -> str:
        text = f"loaded {len(self.loaded)} encoder tensors from {self.path}"
        if self.missing:
            text += (
                f"; {len(self.missing)} encoder tensors not in the file, left as initialised: "
                f"{_listing(self.missing, limit)}"
            )
        if self.unexpected:
            text += (
                f"; {len(self.unexpected)} tensors of the file not in the encoder, ignored: "
                f"{_listing(self.unexpected, limit)}"
            )
        return text


def _listing(keys: list[str], limit: int) -> str:
    """Keys grouped by their first name (``fc.weight, fc.bias`` -> ``fc.* (2)``), at most ``limit`` groups."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split(".", 1)[0], []).append(key)
    items = [members[0] if len(members) == 1 else f"{head}.* ({len(members)})" for head, members in groups.items()]
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more groups)" if len(items) > limit else "")


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The flat ``name -> tensor`` mapping inside a checkpoint (plain, or under a container key)."""
    state = obj
    while isinstance(state, Mapping):
        inner = next((state[k] for k in _CONTAINER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping):
        raise ConfigError(f"model.pretrained: {path} holds a {type(obj).__name__}, not a state_dict")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(state)[:10]))
        raise ConfigError(f"model.pretrained: no tensors in {path} (top-level keys: {keys})")
    return tensors


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _optional(encoder: nn.Module, key: str) -> bool:
    """Encoder tensors a compatible file may lack: BN counters, and what the encoder declares."""
    prefixes = getattr(encoder, "optional_pretrained_prefixes", ())
    return key.endswith("num_batches_tracked") or any(key.startswith(p) for p in prefixes)


def load_encoder_weights(encoder: nn.Module, path: Union[str, Path]) -> PretrainedReport:
    """Copy the weights in the local file ``path`` into ``encoder``; return what was loaded.

    The file is read with ``torch.load(weights_only=True)`` on the CPU. It may hold a plain
    state_dict or one under a ``"state_dict"`` or ``"model"`` key (or ``"teacher"``/``"student"``: an
    sclseg training checkpoint, the teacher preferred); leading ``module.`` (DataParallel)
    and ``encoder.`` (a whole sclseg model) prefixes are stripped. Tensors the encoder has no place for
    (a classifier ``fc.*``, a segmentation head) are ignored and reported. Errors
    (:class:`~sclseg.config.ConfigError`): a missing or unreadable file, a tensor whose shape differs
    from the encoder's, no tensor matching at all, or encoder tensors missing from the file (other than
    BatchNorm counters and what the encoder lists in ``optional_pretrained_prefixes``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.pretrained: weights file not found: {path} (weights are never downloaded)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        message = f"model.pretrained: cannot read {path} as PyTorch weights (weights_only=True): {exc}"
        raise ConfigError(message) from exc
    tensors: dict[str, torch.Tensor] = {}
    for key, value in _unwrap(obj, path).items():
        tensors.setdefault(_strip(key), value)

    own = encoder.state_dict()
    report = PretrainedReport(str(path))
    report.unexpected = [k for k in tensors if k not in own]
    matched = [k for k in own if k in tensors]
    if not matched:
        raise ConfigError(
            f"model.pretrained: no tensor in {path} matches the {type(encoder).__name__} encoder; "
            f"the file has e.g. {', '.join(list(tensors)[:5])}; the encoder expects e.g. {', '.join(list(own)[:5])}"
        )
    wrong = [k for k in matched if tensors[k].shape != own[k].shape]
    if wrong:
        details = "; ".join(f"{k}: file {tuple(tensors[k].shape)} vs encoder {tuple(own[k].shape)}" for k in wrong[:8])
        more = f" (and {len(wrong) - 8} more)" if len(wrong) > 8 else ""
        raise ConfigError(
            f"model.pretrained: {len(wrong)} tensors in {path} do not fit the {type(encoder).__name__} encoder: "
            f"{details}{more}"
        )
    missing = [k for k in own if k not in tensors]
    required = [k for k in missing if not _optional(encoder, k)]
    if required:
        shown = ", ".join(required[:8]) + (f", ... ({len(required) - 8} more)" if len(required) > 8 else "")
        raise ConfigError(
            f"model.pretrained: {path} lacks {len(required)} of the {type(encoder).__name__} encoder's tensors "
            f"({shown}); is it a checkpoint of another network or depth?"
        )
    encoder.load_state_dict({**own, **{k: tensors[k] for k in matched}}, strict=True)
    report.loaded = matched
    report.missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    _log.info("%s", report.summary())
    if report.missing or report.unexpected:
        warnings.warn(f"model.pretrained: {report.summary()}", stacklevel=2)
    return report
