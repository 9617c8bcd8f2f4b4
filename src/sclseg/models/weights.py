"""Weight files for ``model.pretrained``: whole networks and encoders, in sclseg's and published layouts.

A file initialises either the **whole network** (every tensor of the model is in it, e.g. NVIDIA's
``cityscapes_best.pth``, UniMatch's ``best.pth``, an sclseg checkpoint of the same model) or the
**encoder** only (ImageNet or other pre-training files: NVIDIA's ``wider_resnet38.pth.tar``, UniMatch's
``resnet101.pth``, torchvision's ``resnet50-*.pth``); the rest keeps its initial values.

How a model's keys relate to the files published for it is one :class:`WeightLayout` per
``model.name``, in the model registry (:data:`sclseg.models.registry.MODELS`). To let a model read a
new published layout, give its entry a layout whose ``rename`` maps that file's key names onto the
model's own (and ``convert`` whatever cannot be renamed key by key) and whose ``containers`` say
where the file keeps its tensors. Every file is read with
:func:`sclseg.serialization.safe_load` (``weights_only=True`` plus exactly the NumPy scalar types
published checkpoints hold); nothing is ever downloaded. A path ``sclseg:NAME`` names a file
shipped inside the package (``sclseg:weights/compact16_digit_crops.pt``, see
:mod:`sclseg.digits_encoder`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import torch
from torch import nn

from sclseg.config import ConfigError
from sclseg.serialization import UnsafeFileError, safe_load

__all__ = [
    "WeightLayout",
    "PretrainedReport",
    "SCLSEG_LAYOUT",
    "NVIDIA_WRN38_LAYOUT",
    "UNIMATCH_V1_LAYOUT",
    "UNIMATCH_V2_LAYOUT",
    "DINOV3_LAYOUT",
    "prefer_container",
    "dinov3_from_meta",
    "PACKAGE_SCHEME",
    "resolve_path",
    "read_file",
    "read_state",
    "load_weights",
    "load_encoder_weights",
]

_log = logging.getLogger("sclseg.models")

Scope = Literal["network", "encoder"]


def _same(key: str) -> Optional[str]:
    return key


@dataclass(frozen=True)
class WeightLayout:
    """How one model's ``state_dict`` relates to the weight files people have for it.

    Attributes:
        rename: maps a file's key (leading ``module.`` removed) to the model's key, or to None to
            drop the tensor (e.g. a pre-training token the model has no use for). Keys the model
            already uses must map to themselves, so that sclseg's own files keep loading.
        containers: the dict keys under which checkpoints keep their weights, in order of preference.
        encoder_keys: prefixes of the model's own keys that make up its encoder.
        encoder_prefix: what goes in front of an encoder-only file's keys (after ``rename``) when the
            model does not have them as they are (torchvision's ``conv1.weight`` is the model's
            ``encoder.conv1.weight``).
        convert: applied to the renamed tensors as a whole, for what one key at a time cannot
            express (one file tensor split into two model tensors); None: nothing to do.
        optional: model keys a file may lack without error (tensors the forward pass never uses);
            they keep their initial values and are reported as missing.
    """

    rename: Callable[[str], Optional[str]] = _same
    containers: tuple[str, ...] = ("state_dict", "model", "teacher", "student")
    encoder_keys: tuple[str, ...] = ("encoder.",)
    encoder_prefix: str = "encoder."
    convert: Optional[Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = None
    optional: tuple[str, ...] = ()


#: The layout of sclseg's DeepLabV3+ models (an ``encoder`` submodule and a head).
SCLSEG_LAYOUT = WeightLayout()


#: Containers of the trained (not averaged) network in files that hold an EMA copy beside it:
#: UniMatch V2's ``model`` (beside ``model_ema``), sclseg's ``student`` (beside ``teacher``).
_TRAINED_CONTAINERS = ("model", "student")


def prefer_container(layout: WeightLayout, weights: Literal["ema", "model"] = "ema") -> WeightLayout:
    """``layout`` as it is for ``weights="ema"``; for ``weights="model"`` (``model.pretrained_weights``)
    preferring the trained network's container over the EMA one in files holding both."""
    if weights == "ema":
        return layout
    if weights != "model":
        raise ConfigError(f"model.pretrained_weights must be ema or model, got {weights!r}")
    first = tuple(c for c in layout.containers if c in _TRAINED_CONTAINERS)
    return replace(layout, containers=first + tuple(c for c in layout.containers if c not in first))


@dataclass
class PretrainedReport:
    """What :func:`load_weights` did with a weights file.

    ``scope`` is ``"network"`` when the file initialised every tensor of the model, ``"encoder"``
    when it initialised the encoder only.
    """

    path: str
    scope: Scope = "encoder"
    loaded: list[str] = field(default_factory=list)  # model tensors taken from the file
    missing: list[str] = field(default_factory=list)  # model tensors the file lacks (left as initialised)
    unexpected: list[str] = field(default_factory=list)  # file tensors the model does not take (ignored)

    def summary(self, limit: int = 8) -> str:
        what = "network" if self.scope == "network" else "encoder"
        text = f"loaded {len(self.loaded)} {what} tensors from {self.path}"
        if self.missing:
            text += (
                f"; {len(self.missing)} {what} tensors not in the file, left as initialised: "
                f"{_listing(self.missing, limit)}"
            )
        if self.unexpected:
            text += (
                f"; {len(self.unexpected)} tensors of the file not in the {what}, ignored: "
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


def _shown(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


#: Prefix of a weights path that names a file shipped inside the sclseg package.
PACKAGE_SCHEME = "sclseg:"


def resolve_path(path: Union[str, Path]) -> Path:
    """The file ``path`` names: ``sclseg:NAME`` is ``NAME`` inside the installed package, any
    other path is taken as it is (``~`` expanded, relative to the working directory)."""
    text = str(path)
    if text.startswith(PACKAGE_SCHEME):
        return Path(__file__).resolve().parent.parent / text[len(PACKAGE_SCHEME) :]
    return Path(text).expanduser()


def read_file(path: Union[str, Path], *, what: str = "model.pretrained") -> Any:
    """The contents of the weights file ``path`` (:func:`resolve_path`; read with
    :func:`~sclseg.serialization.safe_load`).

    Raises :class:`~sclseg.config.ConfigError` naming ``what`` (the setting or flag that named the
    file) and the file when it is missing, unreadable or unsafe.
    """
    path = resolve_path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: weights file not found: {path} (weights are never downloaded)")
    try:
        return safe_load(path)
    except UnsafeFileError as exc:
        raise ConfigError(f"{what}: cannot read {path} as PyTorch weights (weights_only=True): {exc}") from exc


def read_state(
    path: Union[str, Path],
    layout: WeightLayout = SCLSEG_LAYOUT,
    *,
    container: Optional[str] = None,
    contents: Any = None,
    what: str = "model.pretrained",
) -> dict[str, torch.Tensor]:
    """The tensors of the weights file ``path``, under the model's key names.

    The file may hold a plain state_dict or one under a container key: ``container`` when given,
    otherwise the first of ``layout.containers`` present (nested containers are followed).
    Leading ``module.`` (DataParallel/DDP) prefixes are removed, then ``layout.rename`` applied.
    ``contents``: the file's contents when they were read already (:func:`read_file`).
    Raises :class:`~sclseg.config.ConfigError` naming the file for a missing, unreadable or
    unsafe file and for one without tensors.
    """
    obj = read_file(path, what=what) if contents is None else contents
    state = obj
    if container is not None:
        if not isinstance(obj, Mapping) or not isinstance(obj.get(container), Mapping):
            found = ", ".join(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise ConfigError(f"{what}: {path} has no weights under '{container}' (it has: {found})")
        state = obj[container]
    while isinstance(state, Mapping):
        inner = next((state[k] for k in layout.containers if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping):
        raise ConfigError(f"{what}: {path} holds a {type(obj).__name__}, not a state_dict")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            own = layout.rename(_strip_module(str(key)))
            if own is not None:
                tensors.setdefault(own, value)
    if layout.convert is not None:
        tensors = layout.convert(tensors)
    if not tensors:
        keys = ", ".join(map(str, list(state)[:10]))
        raise ConfigError(f"{what}: no tensors in {path} (top-level keys: {keys})")
    return tensors


def _counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def load_weights(
    model: nn.Module,
    path: Union[str, Path],
    layout: WeightLayout = SCLSEG_LAYOUT,
    *,
    scope: Optional[Scope] = None,
    container: Optional[str] = None,
    contents: Any = None,
    what: str = "model.pretrained",
) -> PretrainedReport:
    """Copy the tensors of the local file ``path`` into ``model``; return what was loaded.

    ``scope=None`` decides from the file: the whole network when the file holds every tensor of
    the model with the model's shape (BatchNorm ``num_batches_tracked`` counters may be absent),
    the encoder (``layout.encoder_keys``) otherwise; ``scope="network"`` requires the former.
    For the encoder, a file key is taken as it is when the model has it, else with
    ``layout.encoder_prefix`` in front. Tensors the model does not take are ignored and reported.
    ``contents``: the file's contents when they were read already; ``what``: the setting or flag
    that named the file, for messages.
    Errors (:class:`~sclseg.config.ConfigError`, naming the file and the keys): see
    :func:`read_state`; a tensor whose shape differs from the model's; no tensor matching at all;
    model (or encoder) tensors missing from the file.
    """
    tensors = read_state(path, layout, container=container, contents=contents, what=what)
    own = model.state_dict()
    network = scope != "encoder" and all(
        k in tensors and tensors[k].shape == v.shape for k, v in own.items()
        if not _counter(k) and k not in layout.optional
    )
    if scope == "network" and not network:
        _raise_mismatch(what, path, tensors, own, type(model).__name__, "network", layout.optional)
    if network:
        targets = {k: k for k in tensors if k in own}
        wanted = list(own)
        scope = "network"
    else:
        wanted = [k for k in own if k.startswith(layout.encoder_keys)]
        targets = {}
        for key in tensors:
            for candidate in (key, layout.encoder_prefix + key):
                if candidate in wanted:
                    targets[key] = candidate
                    break
        scope = "encoder"
        _raise_mismatch(what, path, {targets[k]: tensors[k] for k in targets}, {k: own[k] for k in wanted},
                        type(model).__name__, "encoder", layout.optional)
    model.load_state_dict({**own, **{target: tensors[key] for key, target in targets.items()}}, strict=True)
    taken = set(targets.values())
    report = PretrainedReport(str(path), scope)
    report.loaded = [k for k in wanted if k in taken]
    report.missing = [k for k in wanted if k not in taken and not _counter(k)]
    report.unexpected = [k for k in tensors if k not in targets]
    _log.info("%s", report.summary())
    if report.missing or report.unexpected:
        warnings.warn(f"{what}: {report.summary()}", stacklevel=2)
    return report


def _raise_mismatch(
    what: str, path: Union[str, Path], found: Mapping[str, torch.Tensor], wanted: Mapping[str, torch.Tensor],
    owner: str, part: str, optional: tuple[str, ...] = (),
) -> None:
    """Raise the :class:`ConfigError` that says why ``found`` cannot initialise ``wanted`` (if it cannot)."""
    matched = [k for k in wanted if k in found]
    if not matched:
        raise ConfigError(
            f"{what}: no tensor in {path} matches the {owner} {part}; the file has e.g. "
            f"{', '.join(list(found)[:5]) or '(nothing usable)'}; the {part} expects e.g. {', '.join(list(wanted)[:5])}"
        )
    wrong = [k for k in matched if found[k].shape != wanted[k].shape]
    if wrong:
        details = "; ".join(f"{k}: file {tuple(found[k].shape)} vs {part} {tuple(wanted[k].shape)}" for k in wrong[:8])
        more = f" (and {len(wrong) - 8} more)" if len(wrong) > 8 else ""
        raise ConfigError(f"{what}: {len(wrong)} tensors in {path} do not fit the {owner} {part}: {details}{more}")
    required = [k for k in wanted if k not in found and not _counter(k) and k not in optional]
    if required:
        raise ConfigError(
            f"{what}: {path} lacks {len(required)} of the {owner} {part}'s tensors ({_shown(required)}); "
            "is it a checkpoint of another network or depth?"
        )


#: A standalone encoder reads files of the whole sclseg model too: their ``encoder.`` prefix is removed.
_STANDALONE = WeightLayout(
    rename=lambda key: key[len("encoder.") :] if key.startswith("encoder.") else key, encoder_keys=("",
                                                                                                    ), encoder_prefix=""
)


def load_encoder_weights(encoder: nn.Module, path: Union[str, Path]) -> PretrainedReport:
    """Copy the weights in the local file ``path`` into the module ``encoder`` (its every tensor).

    Accepts what :func:`read_state` reads; a leading ``encoder.`` (a whole sclseg model's file) is
    removed from the keys, and tensors the encoder has no place for (a classifier, a head) are
    ignored and reported.
    """
    return load_weights(encoder, path, _STANDALONE, scope="encoder")


def _nvidia_wrn38(key: str) -> Optional[str]:
    """NVIDIA's ``DeepWV3Plus`` and ``WiderResNetA2`` names: the trunk's ``mod*`` sit under ``encoder.``.

    The ImageNet file's ``bn_out.*`` and ``classifier.fc.*`` keep their names (the segmentation
    network has no place for them).
    """
    return f"encoder.{key}" if key.startswith("mod") else key


def _unimatch_v1(key: str) -> Optional[str]:
    """UniMatch V1's ``DeepLabV3Plus`` names: its ``backbone.`` is the model's ``encoder.``."""
    return f"encoder.{key[len('backbone.'):]}" if key.startswith("backbone.") else key


def _meta_dinov3_block(key: str) -> str:
    """timm's name for a tensor of Meta's DINOv3 transformer (``storage_tokens`` -> ``reg_token``,
    ``blocks.N.ls1.gamma`` -> ``blocks.N.gamma_1``); other names are the same in both."""
    if key == "storage_tokens" or key.endswith(".storage_tokens"):
        return key[: -len("storage_tokens")] + "reg_token"
    return key.replace(".ls1.gamma", ".gamma_1").replace(".ls2.gamma", ".gamma_2")


def dinov3_from_meta(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta's DINOv3 tensors (``dinov3_vit*16_pretrain_*.pth``, or under a prefix such as ``encoder.``)
    under the names of :class:`sclseg.models.dinov3.DINOv3Encoder` (timm's).

    ``attn.qkv.bias`` ``(3D,)`` is applied by Meta as ``bias * bias_mask``, the mask 1 on the query
    and value thirds and 0 on the key third: it becomes ``attn.q_bias`` and ``attn.v_bias`` (the
    key bias is zero in both). ``bias_mask`` is checked to be that mask and then dropped. What has
    no place in the encoder stays under its own name, so that loading reports it as ignored:
    ``mask_token`` (masked-image pre-training), ``rope_embed.periods`` (recomputed from the RoPE
    base), ``local_cls_norm`` (pre-training on local crops). Tensors already under timm's names
    (sclseg's own checkpoints) pass unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(".attn.qkv.bias_mask"):
            _check_key_mask(key, value)
        elif key.endswith(".attn.qkv.bias") and key[: -len("bias")] + "bias_mask" in tensors:
            query, _, values = value.chunk(3)
            out[key.replace(".qkv.bias", ".q_bias")], out[key.replace(".qkv.bias", ".v_bias")] = query, values
        else:
            out[_meta_dinov3_block(key)] = value
    return out


def _check_key_mask(key: str, mask: torch.Tensor) -> None:
    thirds = mask.float().chunk(3)
    if not (bool((thirds[0] == 1).all()) and bool((thirds[1] == 0).all()) and bool((thirds[2] == 1).all())):
        raise ConfigError(f"model.pretrained: {key} is not DINOv3's key-bias mask (1 on the query and value "
                          "thirds, 0 on the key third); this file's attention is not the one DINOv3 defines")


#: NVIDIA's sdcnet files of the Wider ResNet-38 DeepLabV3+.
NVIDIA_WRN38_LAYOUT = WeightLayout(rename=_nvidia_wrn38)
#: UniMatch V1's DeepLabV3+ on the deep-stem ResNets.
UNIMATCH_V1_LAYOUT = WeightLayout(rename=_unimatch_v1)
# UniMatch V2's DPT has the same ``backbone.`` (Meta's DINOv2 names) and ``head.``; its checkpoints
# hold the EMA network (``model_ema``) beside the trained one (``model``): the EMA by default.
# Meta's DINOv2 ``mask_token`` is missing from timm's DINOv2 files and never used by segmentation.
_UNIMATCH_V2_CONTAINERS = ("model_ema", "teacher", "model", "student", "state_dict")
UNIMATCH_V2_LAYOUT = WeightLayout(rename=_unimatch_v1, containers=_UNIMATCH_V2_CONTAINERS,
                                  optional=("encoder.mask_token",))
#: UniMatch V2's layout with Meta's DINOv3 names in ``backbone.``.
DINOV3_LAYOUT = replace(UNIMATCH_V2_LAYOUT, convert=dinov3_from_meta, optional=())
