"""Trained networks out of a run: the weights-only inference file, and the network a checkpoint holds.

:func:`export_weights` writes ``format: sclseg-weights-1`` (``sclseg export CKPT OUT.pt``);
:func:`build_model_from_checkpoint` rebuilds the network of a training checkpoint or of such a
file (``sclseg predict`` and ``sclseg evaluate`` take either).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from sclseg.config import Config, config_from_dict
from sclseg.engine.checkpoint import WEIGHTS_FORMAT, load_checkpoint, save_atomic
from sclseg.models import create_model

__all__ = ["export_weights", "build_model_from_checkpoint"]


def export_weights(checkpoint: Union[str, Path], out: Union[str, Path], *, use_teacher: bool = True,
                   dtype: Optional[torch.dtype] = None) -> dict:
    """Write the weights-only inference file of a training checkpoint (or re-export weights).

    The file holds one network (the EMA teacher by default, the student on request) as a
    ``state_dict`` of tensors, the resolved config and the class names and colours, and nothing
    else: no optimizer, no RNG state. ``dtype`` (e.g. ``torch.float16``) casts floating tensors.
    Returns a summary of what was written.
    """
    ckpt = load_checkpoint(checkpoint)
    if ckpt["format"] == WEIGHTS_FORMAT:
        weights, role = ckpt["model"], ckpt.get("weights", "teacher")
    else:
        role = "teacher" if use_teacher else "student"
        weights = ckpt[role]
    if dtype is not None:
        weights = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in weights.items()}
    exported = {
        "format": WEIGHTS_FORMAT,
        "model": {k: v.detach().cpu().contiguous() for k, v in weights.items()},
        "weights": role,
        "config": ckpt["config"],
        "num_classes": ckpt["num_classes"],
        "class_names": ckpt["class_names"],
        "class_colors": ckpt["class_colors"],
        "iteration": ckpt.get("iteration"),
        "source": str(checkpoint),
    }
    save_atomic(exported, Path(out))
    return {"out": str(out), "weights": role, "iteration": exported["iteration"], "tensors": len(weights),
            "bytes": Path(out).stat().st_size}


def build_model_from_checkpoint(ckpt: dict, *, use_teacher: bool = True, source: Union[None, str, Path] = None
                                ) -> tuple[nn.Module, Config]:
    """The network stored in a checkpoint (teacher/EMA weights by default) and its config.

    Accepts training checkpoints and exported weights files (``sclseg export``).
    """
    where = f"{source}: " if source is not None else ""
    cfg = config_from_dict(ckpt["config"])
    model = create_model(cfg.model, ckpt["num_classes"], load_pretrained=False)
    if ckpt.get("format") == WEIGHTS_FORMAT or "model" in ckpt:
        held = ckpt.get("weights", "teacher")
        if not use_teacher and held != "student":
            raise ValueError(f"{where}this exported file holds the {held} weights only; the student's are in the "
                             "training checkpoint it was exported from (or an export of the student)")
        key = "model"
    else:
        key = "teacher" if use_teacher and "teacher" in ckpt else "student"
    try:
        model.load_state_dict(ckpt[key])
    except RuntimeError as exc:
        raise ValueError(
            f"{where}checkpoint weights do not fit model '{cfg.model.name}' with {ckpt['num_classes']} classes: {exc}"
        ) from exc
    return model, cfg
