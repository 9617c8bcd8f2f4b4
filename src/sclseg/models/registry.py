"""The model registry: ``model.name`` -> how to build the network and how its weight files are laid out.

:data:`MODELS` is the only place a model name is written; the config, the builder
(:func:`sclseg.models.create_model`), the weight loader and the benchmarks read the names from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from torch import nn

from sclseg.config import ConfigError, ModelConfig
from sclseg.models.compact import CompactEncoder
from sclseg.models.deeplab import DeepLabV3Plus
from sclseg.models.dpt import DPT
from sclseg.models.resnet import ResNetEncoder
from sclseg.models.resnet_deepstem import DeepStemDeepLabV3Plus
from sclseg.models.weights import (
    DINOV3_LAYOUT,
    NVIDIA_WRN38_LAYOUT,
    SCLSEG_LAYOUT,
    UNIMATCH_V1_LAYOUT,
    UNIMATCH_V2_LAYOUT,
    WeightLayout,
    prefer_container,
)
from sclseg.models.wrn38 import DeepWV3Plus

__all__ = ["ModelEntry", "MODELS", "MODEL_NAMES", "ASPP_RATES", "layout_for", "check_model_name"]

#: ASPP dilation rates of the paper-scale models (Chen et al.; Zhu et al.), by output stride.
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18)}

Builder = Callable[[ModelConfig, int], nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """One registered network.

    Attributes:
        build: ``(model config, number of classes) -> network`` (random initial weights).
        encoder: what the encoder is, in a few words (for listings).
        layout: how the weight files published for it name its tensors (:mod:`sclseg.models.weights`).
        pretrained: ``model.pretrained`` names (``imagenet``, ``dinov2``, ``dinov3``) -> the timm
            pretrained tag (``architecture.tag``) whose weights initialise the encoder
            (:mod:`sclseg.models.pretrained`).
    """

    build: Builder
    encoder: str
    layout: WeightLayout = SCLSEG_LAYOUT
    pretrained: dict[str, str] = field(default_factory=dict)


def _compact(cfg: ModelConfig, num_classes: int) -> nn.Module:
    w = cfg.width
    rates = (2, 4, 6) if cfg.output_stride == 8 else (1, 2, 3)
    return DeepLabV3Plus(CompactEncoder(w, cfg.output_stride), num_classes, aspp_rates=rates, aspp_channels=4 * w,
                         low_level_channels=w // 2, decoder_channels=2 * w)


def _torchvision_resnet(depth: Literal[50, 101]) -> Builder:
    return lambda cfg, k: DeepLabV3Plus(ResNetEncoder(depth, cfg.output_stride), k,
                                        aspp_rates=ASPP_RATES[cfg.output_stride])


def _deepstem_resnet(depth: Literal[50, 101]) -> Builder:
    return lambda cfg, k: DeepStemDeepLabV3Plus(k, depth, cfg.output_stride)


def _dpt(size: str, family: str) -> Builder:
    return lambda cfg, k: DPT(size, k, family=family)  # patches of 14 or 16: model.output_stride does not apply


def _dpt_entries(family: str, label: str, patch: int, layout: WeightLayout, tag: str) -> dict[str, ModelEntry]:
    """``dpt_<family>_{small,base,large}``; ``tag``: the timm pretrained tag, ``{size}`` filled in."""
    letters = {"small": "S", "base": "B", "large": "L"}
    return {
        f"dpt_{family}_{size}": ModelEntry(_dpt(size, family), f"{label} ViT-{letter}/{patch} + UniMatch V2's DPT head",
                                           layout, {family: tag.format(size=size)})
        for size, letter in letters.items()
    }


MODELS: dict[str, ModelEntry] = {
    "compact": ModelEntry(_compact, "small residual CNN (trains on a CPU)"),
    "deeplabv3plus_wrn38": ModelEntry(lambda cfg, k: DeepWV3Plus(k, cfg.output_stride),
                                      "Wider ResNet-38 A2, Zhu et al.'s DeepWV3Plus", NVIDIA_WRN38_LAYOUT),
    "deeplabv3plus_resnet50": ModelEntry(_torchvision_resnet(50), "torchvision ResNet-50, dilated",
                                         pretrained={"imagenet": "resnet50.tv_in1k"}),
    "deeplabv3plus_resnet101": ModelEntry(_torchvision_resnet(101), "torchvision ResNet-101, dilated",
                                          pretrained={"imagenet": "resnet101.tv_in1k"}),
    "deeplabv3plus_resnet50_deepstem": ModelEntry(_deepstem_resnet(50), "deep-stem ResNet-50, UniMatch V1's DeepLabV3+",
                                                  UNIMATCH_V1_LAYOUT, {"imagenet": "resnet50s.gluon_in1k"}),
    "deeplabv3plus_resnet101_deepstem": ModelEntry(_deepstem_resnet(101),
                                                   "deep-stem ResNet-101, UniMatch V1's DeepLabV3+",
                                                   UNIMATCH_V1_LAYOUT, {"imagenet": "resnet101s.gluon_in1k"}),
    **_dpt_entries("dinov2", "DINOv2", 14, UNIMATCH_V2_LAYOUT, "vit_{size}_patch14_dinov2.lvd142m"),
    **_dpt_entries("dinov3", "DINOv3", 16, DINOV3_LAYOUT, "vit_{size}_patch16_dinov3_qkvb.lvd1689m"),
}

MODEL_NAMES: tuple[str, ...] = tuple(MODELS)


def check_model_name(name: str, key: str = "model.name") -> ModelEntry:
    """The entry of ``name``; a :class:`ConfigError` naming ``key`` and the choices when there is none."""
    if name not in MODELS:
        raise ConfigError(f"{key}: expected one of {', '.join(MODELS)}, got {name!r}")
    return MODELS[name]


def layout_for(model_name: str, weights: Literal["ema", "model"] = "ema") -> WeightLayout:
    """The weight layout of ``model_name``; ``weights="model"`` (``model.pretrained_weights``) prefers the
    trained network's container over the EMA one in files holding both."""
    return prefer_container(check_model_name(model_name).layout, weights)
