"""The model builder: one function from a :class:`~sclseg.config.ModelConfig` to a network.

Every model maps images ``(B, 3, H, W)`` in ``[0, 1]`` to logits ``(B, K, H, W)``.

===============================  ==============================================  ===================
``model.name``                   encoder                                         low / high stride
===============================  ==============================================  ===================
compact                          small residual CNN (trains on a CPU)            2 / 8 or 16
deeplabv3plus_wrn38              Wider ResNet-38 A2, Zhu et al.'s DeepWV3Plus    2 / 8 or 16
deeplabv3plus_resnet50           torchvision ResNet-50, dilated                  4 / 8 or 16
deeplabv3plus_resnet101          torchvision ResNet-101, dilated                 4 / 8 or 16
deeplabv3plus_resnet50_deepstem  deep-stem ResNet-50, UniMatch V1's DeepLabV3+   4 / 8 or 16
deeplabv3plus_resnet101_deepstem deep-stem ResNet-101, UniMatch V1's DeepLabV3+  4 / 8 or 16
dpt_dinov2_small                 DINOv2 ViT-S/14 + DPT head, UniMatch V2's DPT   14 (patches)
dpt_dinov2_base                  DINOv2 ViT-B/14 + DPT head, UniMatch V2's DPT   14 (patches)
dpt_dinov2_large                 DINOv2 ViT-L/14 + DPT head, UniMatch V2's DPT   14 (patches)
===============================  ==============================================  ===================

``model.pretrained`` names a local file of weights, of the whole network or of its encoder (see
:mod:`sclseg.models.weights`); nothing is ever downloaded.
"""

from __future__ import annotations

from torch import nn

from sclseg.config import ConfigError, ModelConfig
from sclseg.models.compact import CompactEncoder
from sclseg.models.deeplab import DeepLabV3Plus
from sclseg.models.dpt import DPT
from sclseg.models.resnet import ResNetEncoder
from sclseg.models.resnet_deepstem import DeepStemDeepLabV3Plus
from sclseg.models.weights import PretrainedReport, layout_for, load_encoder_weights, load_weights
from sclseg.models.wrn38 import DeepWV3Plus

__all__ = ["create_model", "load_encoder_weights", "load_weights", "PretrainedReport", "MODEL_NAMES"]

MODEL_NAMES = (
    "compact",
    "deeplabv3plus_wrn38",
    "deeplabv3plus_resnet50",
    "deeplabv3plus_resnet101",
    "deeplabv3plus_resnet50_deepstem",
    "deeplabv3plus_resnet101_deepstem",
    "dpt_dinov2_small",
    "dpt_dinov2_base",
    "dpt_dinov2_large",
)

#: ASPP dilation rates of the paper-scale models (Chen et al.; Zhu et al.), by output stride.
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}


def create_model(cfg: ModelConfig, num_classes: int, *, load_pretrained: bool = True) -> nn.Module:
    """Build the network named by ``cfg.name`` for ``num_classes`` classes.

    With ``cfg.pretrained`` set (and ``load_pretrained``), weights are read from that local file: the
    whole network's when the file holds them all, else the encoder's (:func:`load_weights`). Pass
    ``load_pretrained=False`` when full weights follow anyway (restoring a checkpoint), so that the
    file need not exist on the machine.
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
        model = DeepWV3Plus(num_classes, cfg.output_stride)
    elif name in ("deeplabv3plus_resnet50", "deeplabv3plus_resnet101"):
        depth = 50 if name.endswith("50") else 101
        model = DeepLabV3Plus(
            ResNetEncoder(depth, cfg.output_stride), num_classes, aspp_rates=ASPP_RATES[cfg.output_stride]
        )
    elif name in ("deeplabv3plus_resnet50_deepstem", "deeplabv3plus_resnet101_deepstem"):
        model = DeepStemDeepLabV3Plus(num_classes, 50 if "resnet50" in name else 101, cfg.output_stride)
    elif name in ("dpt_dinov2_small", "dpt_dinov2_base", "dpt_dinov2_large"):
        model = DPT(name.rsplit("_", 1)[1], num_classes)  # patch 14: model.output_stride does not apply
    else:
        raise ConfigError(f"model.name '{name}' is unknown; available: {', '.join(MODEL_NAMES)}")
    if cfg.pretrained and load_pretrained:
        model.pretrained_report = load_weights(model, cfg.pretrained, layout_for(name, cfg.pretrained_weights))
    return model
