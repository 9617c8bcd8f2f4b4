"""The model builder: one function from a :class:`~sclseg.config.ModelConfig` to a network.

Every model maps images ``(B, 3, H, W)`` in ``[0, 1]`` to logits ``(B, K, H, W)``.
"""

from __future__ import annotations

from torch import nn

from sclseg.config import ConfigError, ModelConfig
from sclseg.models.compact import CompactEncoder
from sclseg.models.deeplab import DeepLabV3Plus

__all__ = ["create_model", "MODEL_NAMES"]

MODEL_NAMES = ("compact",)


def create_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build the network named by ``cfg.name`` for ``num_classes`` classes."""
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if cfg.name == "compact":
        w = cfg.width
        encoder = CompactEncoder(w, cfg.output_stride)
        rates = (2, 4, 6) if cfg.output_stride == 8 else (1, 2, 3)
        return DeepLabV3Plus(
            encoder, num_classes, aspp_rates=rates, aspp_channels=4 * w, low_level_channels=w // 2, decoder_channels=2 * w
        )
    raise ConfigError(f"model.name '{cfg.name}' is unknown; available: {', '.join(MODEL_NAMES)}")
