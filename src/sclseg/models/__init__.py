"""The model builder: one function from a :class:`~sclseg.config.ModelConfig` to a network.

Every model maps images ``(B, 3, H, W)`` in ``[0, 1]`` to logits ``(B, K, H, W)``. The names, their
builders and their weight layouts are in :data:`sclseg.models.registry.MODELS`:

===============================  ==============================================  ===================
``model.name``                   encoder                                         low / high stride
===============================  ==============================================  ===================
compact                          small residual CNN (trains on a CPU)            2 / 8 or 16
deeplabv3plus_wrn38              Wider ResNet-38 A2, Zhu et al.'s DeepWV3Plus    2 / 8 or 16
deeplabv3plus_resnet50           torchvision ResNet-50, dilated                  4 / 8 or 16
deeplabv3plus_resnet101          torchvision ResNet-101, dilated                 4 / 8 or 16
deeplabv3plus_resnet50_deepstem  deep-stem ResNet-50, UniMatch V1's DeepLabV3+   4 / 8 or 16
deeplabv3plus_resnet101_deepstem deep-stem ResNet-101, UniMatch V1's DeepLabV3+  4 / 8 or 16
dpt_dinov2_small / base / large  DINOv2 ViT-S/B/L/14 + DPT head, UniMatch V2's   14 (patches)
dpt_dinov3_small / base / large  DINOv3 ViT-S/B/L/16 + DPT head, UniMatch V2's   16 (patches)
===============================  ==============================================  ===================

``model.pretrained`` names a local file of weights, of the whole network or of its encoder (see
:mod:`sclseg.models.weights`), or a pretraining by name (``imagenet``, ``dinov2``, ``dinov3``; see
:mod:`sclseg.models.pretrained`).
"""

from __future__ import annotations

from torch import nn

from sclseg.config import ConfigError, ModelConfig
from sclseg.models.pretrained import is_pretrained_name, load_pretrained_by_name
from sclseg.models.registry import MODEL_NAMES, check_model_name, layout_for
from sclseg.models.weights import PretrainedReport, load_encoder_weights, load_weights

__all__ = ["create_model", "load_encoder_weights", "load_weights", "PretrainedReport", "MODEL_NAMES"]


def create_model(cfg: ModelConfig, num_classes: int, *, load_pretrained: bool = True) -> nn.Module:
    """Build the network named by ``cfg.name`` for ``num_classes`` classes.

    With ``cfg.pretrained`` set (and ``load_pretrained``), weights are read from that local file: the
    whole network's when the file holds them all, else the encoder's (:func:`load_weights`); a
    pretraining name (``imagenet``, ``dinov2``, ``dinov3``) initialises the encoder through timm
    (:mod:`sclseg.models.pretrained`). Pass
    ``load_pretrained=False`` when full weights follow anyway (restoring a checkpoint), so that the
    file need not exist on the machine.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if cfg.output_stride not in (8, 16):
        raise ConfigError(f"model.output_stride must be 8 or 16, got {cfg.output_stride}")
    entry = check_model_name(cfg.name)
    model = entry.build(cfg, num_classes)
    if cfg.pretrained and load_pretrained:
        layout = layout_for(cfg.name, cfg.pretrained_weights)
        if is_pretrained_name(cfg.pretrained):
            report = load_pretrained_by_name(model, cfg.name, cfg.pretrained, entry.pretrained, layout)
        else:
            report = load_weights(model, cfg.pretrained, layout)
        model.pretrained_report = report
    return model
