"""Trained networks out of a run: the weights-only inference file, ONNX, and the network a file holds.

* :func:`export_weights` writes ``format: sclseg-weights-1`` (``sclseg export CKPT OUT.pt``);
  :func:`build_model_from_checkpoint` rebuilds the network of a training checkpoint or of such a
  file (``sclseg predict`` and ``sclseg evaluate`` take either).
* :func:`export_onnx` (``sclseg export CKPT OUT.onnx``): the PyTorch model as it is, images
  ``(B, 3, H, W)`` in ``[0, 1]`` (the ImageNet normalisation inside) -> logits ``(B, K, H, W)``, with
  the batch, height and width dynamic (DPT models: sides that are multiples of the patch;
  docs/models.md). The resolved config, the
  class names and colours, and which weights were exported are stored as the file's metadata, so that
  the file alone can be run (:func:`load_onnx`, onnxruntime on the CPU). Needs the ``onnx`` extra
  (``onnx``, ``onnxscript``, ``onnxruntime``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from sclseg.config import Config, ConfigError, config_from_dict
from sclseg.engine.checkpoint import WEIGHTS_FORMAT, load_checkpoint, save_atomic
from sclseg.models import create_model

__all__ = ["DEFAULT_OPSET", "EXAMPLE_SIDE", "OnnxNetwork", "build_model_from_checkpoint", "export_onnx",
           "export_weights",
           "load_onnx"]


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


DEFAULT_OPSET = 18
#: Side of the example image the graph is traced with: a multiple of 14, 16 and 32 (every model's stride).
EXAMPLE_SIDE = 224
_META_KEY = "sclseg"


def _need(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"ONNX files need the onnx extra ({module} is not installed): "
                          "pip install 'sclseg[onnx]'") from None


def export_onnx(checkpoint: Union[str, Path], out: Union[str, Path], *, use_teacher: bool = True,
                opset: int = DEFAULT_OPSET) -> dict:
    """Write the network of ``checkpoint`` (an sclseg checkpoint or weights file) as ONNX to ``out``.

    Returns a summary of what was written. Raises :class:`ConfigError` naming the checkpoint and the
    model when the network cannot be traced, and when the onnx extra is missing.
    """
    onnx = _need("onnx")
    _need("onnxscript")
    ckpt = load_checkpoint(Path(checkpoint))
    model, cfg = build_model_from_checkpoint(ckpt, use_teacher=use_teacher, source=checkpoint)
    model = model.cpu().float().eval()
    example = torch.rand(1, 3, EXAMPLE_SIDE, EXAMPLE_SIDE)
    batch, height, width = (torch.export.Dim(n, min=1 if n == "batch" else 32) for n in ("batch", "height", "width"))
    try:
        # external_data=False: the weights inside the one file (else the exporter also writes OUT.data,
        # which the file saved below no longer needs)
        torch.onnx.export(model, (example,), str(out), dynamo=True, opset_version=opset, input_names=["images"],
                          output_names=["logits"], dynamic_shapes={"images": {0: batch, 2: height, 3: width}},
                          external_data=False)
    except Exception as exc:  # the exporter raises many types; the reason is in the message
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{checkpoint}: {cfg.model.name} cannot be exported to ONNX: {reason}") from None
    weights = ckpt.get("weights", "teacher" if use_teacher else "student")
    meta = {"config": ckpt["config"], "num_classes": ckpt["num_classes"], "class_names": ckpt["class_names"],
            "class_colors": ckpt["class_colors"], "weights": weights, "iteration": ckpt.get("iteration")}
    proto = onnx.load(str(out))
    entry = proto.metadata_props.add()
    entry.key, entry.value = _META_KEY, json.dumps(meta)
    onnx.save(proto, str(out))
    return {"out": str(out), "format": "onnx", "opset": opset, "model": cfg.model.name, "weights": weights,
            "iteration": meta["iteration"], "bytes": Path(out).stat().st_size}


class OnnxNetwork(nn.Module):
    """An exported network run by onnxruntime on the CPU: images ``(B, 3, H, W)`` -> logits ``(B, K, H, W)``.

    A module without parameters, so that code written for PyTorch networks (``.to``, ``.eval``,
    ``predict_probs``) runs it; the logits come back on the device of the images.
    """

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session

    def forward(self, images: Tensor) -> Tensor:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = self.session.run(["logits"], {"images": array})[0]
        return torch.from_numpy(logits).to(images.device)


def load_onnx(path: Union[str, Path]) -> tuple[OnnxNetwork, Config, dict]:
    """The network of an sclseg ONNX file, its config, and its metadata (class names and colours,
    ``num_classes``, ``weights``, ``iteration``). Raises :class:`ConfigError` naming the file when it
    is missing, not ONNX, or not written by sclseg."""
    ort = _need("onnxruntime")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--checkpoint: ONNX file not found: {path}")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own exception types
        raise ConfigError(f"--checkpoint: {path} is not a readable ONNX file ({str(exc).splitlines()[0]})") from None
    text = session.get_modelmeta().custom_metadata_map.get(_META_KEY)
    if text is None:
        raise ConfigError(f"--checkpoint: {path} has no sclseg metadata (expected a file of `sclseg export CKPT "
                          "OUT.onnx`)")
    meta = json.loads(text)
    return OnnxNetwork(session), config_from_dict(meta["config"]), meta
