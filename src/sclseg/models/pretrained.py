"""Pretrained encoders by name: ``model.pretrained: imagenet`` (``dinov2``, ``dinov3`` for the ViTs).

A name resolves through the model's registry entry (:data:`sclseg.models.registry.MODELS`, its
``pretrained``) to a timm pretrained tag, e.g. ``dinov3`` of ``dpt_dinov3_base`` to
``vit_base_patch16_dinov3_qkvb.lvd1689m``. timm builds that network with its weights: from the local
file :func:`local_file` when it exists (``<torch hub dir>/checkpoints/<tag>.safetensors``, read by
timm as a safetensors file, so nothing in it can run code), otherwise downloaded into timm's cache
(the Hugging Face Hub cache) on the first use and read from there afterwards. The network's
tensors then initialise the encoder as a local encoder file would (:func:`~sclseg.models.weights.load_weights`).
Without a network and without the file, the error names the file to place and where.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from sclseg.config import ConfigError
from sclseg.models.weights import PretrainedReport, WeightLayout, load_weights

__all__ = ["PRETRAINED_NAMES", "is_pretrained_name", "local_file", "timm_state", "load_pretrained_by_name"]

#: The names ``model.pretrained`` accepts besides a file path.
PRETRAINED_NAMES = ("imagenet", "dinov2", "dinov3")


def is_pretrained_name(value: str) -> bool:
    """Whether ``model.pretrained`` names a pretraining (rather than a file)."""
    return value in PRETRAINED_NAMES


def local_file(tag: str) -> Path:
    """Where a user places the weights of the timm pretrained ``tag`` for a machine without a network."""
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{tag}.safetensors"


def _source(tag: str) -> str:
    """Where timm downloads ``tag`` from, in words."""
    cfg = timm.models.get_pretrained_cfg(tag)
    hub = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hub:
        name = hub + tag.split(".", 1)[1] if hub.endswith("/") else hub
        return f"model.safetensors of the Hugging Face Hub repository {name}"
    return f"the file at {cfg.url}" if cfg is not None and cfg.url else f"timm's weights of {tag}"


def timm_state(tag: str, what: str = "model.pretrained") -> dict[str, torch.Tensor]:
    """The tensors of timm's network ``tag`` (``architecture.pretraining``) with its pretrained weights.

    Raises :class:`~sclseg.config.ConfigError` naming ``what``, the file to place and where, when the
    weights can be neither read locally nor downloaded.
    """
    local = local_file(tag)
    overlay = {"file": str(local)} if local.is_file() else None
    try:
        network = timm.create_model(tag, pretrained=True, pretrained_cfg_overlay=overlay)
    except (OSError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if overlay is not None:
            raise ConfigError(f"{what}: cannot read {local} as timm's {tag} weights: {reason}") from None
        raise ConfigError(f"{what}: timm's {tag} weights could not be downloaded ({reason}); on a machine without "
                          f"a network, place {_source(tag)} at {local}") from None
    return network.state_dict()


def load_pretrained_by_name(model: nn.Module, model_name: str, name: str, choices: dict[str, str],
                            layout: WeightLayout) -> PretrainedReport:
    """Initialise the encoder of ``model`` (registered as ``model_name``) with the pretraining ``name``.

    ``choices``: the model's pretrained names -> timm tags; ``layout``: its weight layout.
    """
    if name not in choices:
        offered = f"one of: {', '.join(choices)}" if choices else "no pretraining by name"
        raise ConfigError(f"model.pretrained: {model_name} has no '{name}' pretraining ({offered}; "
                          "or give the path of a local weights file)")
    tag = choices[name]
    return load_weights(model, f"{name} (timm {tag})", layout, scope="encoder", contents=timm_state(tag))
