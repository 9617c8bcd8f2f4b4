"""Typed run configuration: dataclasses loaded from YAML, with ``key=value`` overrides.

Every hyper-parameter of the paper is a field here with the paper's value as its default, so
``configs/cityscapes/*.yaml`` only names the data and model. Unknown keys and values of the
wrong type are errors that name the key (and the nearest valid one).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

__all__ = [
    "CityscapesConfig",
    "ClassUniformConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DigitsConfig",
    "EvalConfig",
    "FolderConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "resolve_config_path",
]

PACKAGED_CONFIGS = Path(__file__).parent / "configs"

Method = Literal["supervised", "cl", "scl"]


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


@dataclass
class DigitsConfig:
    """The embedded digit-scenes dataset (see :mod:`sclseg.data.digits`)."""

    image_size: int = 64
    n_train: int = 2000  # scenes in the training pool (labeled + unlabeled)
    n_val: int = 200
    n_test: int = 400
    n_labeled: int = 60  # labeled scenes taken from the training pool; the rest is unlabeled
    min_digits: int = 2
    max_digits: int = 4
    digit_scale: list[int] = field(default_factory=lambda: [3, 5])  # 8x8 digits upscaled this much
    seed: int = 0


@dataclass
class CityscapesConfig:
    """Cityscapes splits (see :mod:`sclseg.data.cityscapes` and docs/data.md)."""

    labeled: Literal["train", "trainval"] = "train"  # fine splits whose labels are used ("trainval" = paper's Ours+)
    split_dir: Optional[str] = None  # UniMatch/CPS folder with labeled.txt (+ unlabeled.txt); cwd- or root-relative
    labeled_fraction: Optional[float] = None  # keep this share of the fine pool labeled (seeded), hold back the rest
    labeled_count: Optional[int] = None  # ... or this many images (e.g. 372 = the community's 1/8)
    split_seed: int = 0
    held_back_unlabeled: bool = True  # fine images whose labels are held back join the unlabeled pool
    extra_unlabeled: bool = True  # leftImg8bit/train_extra images join the unlabeled pool (coarse labels unused)


@dataclass
class FolderConfig:
    """A folder of images and index-PNG masks (see :mod:`sclseg.data.folder`)."""

    classes: list[str] = field(default_factory=list)  # class names; mask value i = classes[i]
    colors: Optional[list[list[int]]] = None  # RGB per class for outputs; None = a default palette
    ignore_value: int = 255  # mask value of unlabelled pixels (mapped to data.ignore_index)
    val_fraction: float = 0.1  # held out of images/ for evaluation when ROOT/val/ is absent
    labeled_fraction: Optional[float] = None  # keep this share of images/ labeled; the rest joins the unlabeled pool
    split_seed: int = 0


@dataclass
class ClassUniformConfig:
    """Class-uniform sampling of labeled crops (Zhu et al.; see :mod:`sclseg.data.class_uniform`)."""

    enabled: bool = False
    fraction: float = 0.5  # share of labeled crops centred on a pixel of a uniformly chosen class
    tile_size: int = 1024  # centroids are computed per class per tile of this size
    cache_dir: Optional[str] = None  # default: <data.root>/.sclseg_cache


@dataclass
class DataConfig:
    name: Literal["digits", "folder", "cityscapes"] = "digits"
    root: Optional[str] = None
    crop_size: list[int] = field(default_factory=lambda: [64, 64])  # H, W of training crops
    batch_size: int = 8  # labeled images per step (per process)
    unlabeled_batch_size: int = 8  # unlabeled images per step (per process), >= 2 for pairing
    num_workers: int = 0
    scale_range: list[float] = field(default_factory=lambda: [0.8, 1.25])
    hflip: bool = False
    color_jitter: float = 0.3
    blur_prob: float = 0.3
    ignore_index: int = 255
    digits: DigitsConfig = field(default_factory=DigitsConfig)
    cityscapes: CityscapesConfig = field(default_factory=CityscapesConfig)
    folder: FolderConfig = field(default_factory=FolderConfig)
    class_uniform: ClassUniformConfig = field(default_factory=ClassUniformConfig)


@dataclass
class ModelConfig:
    name: str = "compact"  # a name of the model registry (sclseg.models.registry.MODELS; see docs/models.md)
    output_stride: Literal[8, 16] = 8
    width: int = 32  # base channel count of the compact model
    pretrained: Optional[str] = None  # local weights file (whole network or encoder), or imagenet / dinov2 / dinov3
    pretrained_weights: Literal["ema", "model"] = "ema"  # of a file with both (UniMatch V2's model_ema/model, sclseg's teacher/student)


@dataclass
class MethodConfig:
    """Section 1 of the design; defaults are the paper's values."""

    name: Method = "scl"
    n_boxes: int = 32  # N
    box_area: float = 0.5
    last_boxes: int = 16  # N_box
    max_pairs: Optional[int] = 9000  # N_pair
    pair_sampling: Literal["pairs", "pixels"] = "pairs"  # how L_sc estimates regions with more than N_pair pairs (see losses)
    lambda_c: float = 20.0
    lambda_sc: float = 3.0
    ema_decay: float = 0.999
    teacher: Literal["ema", "student"] = "ema"  # who predicts the guessed labels; "student": the EMA is kept for evaluation only (Table 3)
    relax_window: int = 3  # boundary label relaxation window w (1 = plain CE)
    rampup_iters: int = 0  # sigmoid ramp-up of the unlabeled weight (0 = none, as in the paper)
    unlabeled_start: int = 0  # supervised warm-up steps before the unlabeled terms start (their unlabeled batches are skipped, not loaded)
    confidence: Optional[float] = None  # L_c only where the teacher's top probability exceeds this (None: everywhere, as the paper)
    sc_confident_only: bool = False  # L_sc only among the pixels that mask keeps (False: every box pixel, as the paper)


@dataclass
class OptimConfig:
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 0.001
    poly_power: float = 1.0
    nesterov: bool = False
    name: Literal["sgd", "adamw"] = "sgd"  # adamw: as UniMatch V2 (see sclseg.engine.optim)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    head_lr_multiplier: float = 1.0  # lr factor of every parameter outside model.encoder (UniMatch V2: 40)


@dataclass
class TrainConfig:
    iterations: int = 1000
    eval_interval: int = 500
    log_interval: int = 50
    checkpoint_interval: int = 500
    keep_last: int = 2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None  # torch intra-op threads on CPU
    amp: Literal["off", "bf16", "fp16"] = "off"  # autocast dtype; fp16 adds a GradScaler
    grad_accum: int = 1  # micro-batches of data.batch_size per optimizer step (one iteration)
    activation_checkpointing: Literal["off", "encoder", "all"] = "off"  # recompute encoder blocks (and the decoder: all) in backward to save memory
    channels_last: bool = False  # NHWC memory format for the model and its inputs
    compile: bool = False  # torch.compile the student (slow first steps; mostly for GPUs)
    teacher_thread: Literal["auto", "on", "off"] = "auto"  # EMA teacher's forward beside the student's; auto: on a CPU with a core to spare
    prefetch: Literal["auto", "on", "off"] = "auto"  # next step's batches loaded beside the backward pass; auto: likewise
    sync_bn: bool = True  # synchronize the student's BatchNorm statistics across processes (DDP)


@dataclass
class EvalConfig:
    split: str = "val"
    use_teacher: bool = True  # evaluate the EMA weights (paper Table 3)
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    tile: Optional[list[int]] = None  # sliding-window tile H, W; None = whole image
    tile_overlap: float = 1.0 / 3.0
    protocol: Literal["tiles", "unimatch_v1", "unimatch_v2"] = "tiles"  # window placement (sclseg.engine.inference); unimatch_*: tile = window (default 801 / 798)
    batch_size: int = 16
    boundary_width: int = 3  # boundary_miou scores the pixels within this many pixels of a label edge; 0 = off


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted where lossless."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value is False and "off" in typing.get_args(tp):
            return "off"  # YAML 1.1 reads a bare `off` (in a file or in key=off) as false
        if value is True and "on" in typing.get_args(tp):
            return "on"  # and a bare `on` as true
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{key}: expected one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def config_from_dict(data: dict) -> Config:
    """A :class:`Config` from nested dicts; missing keys take their defaults."""
    cfg = _build(Config, data or {}, "")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to nested dicts."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.iterations=100")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    return data


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return config_from_dict(apply_overrides(copy.deepcopy(data), overrides or []))
    except ConfigError as exc:
        error = exc
    try:  # whose mistake: the file's, or the command line's?
        config_from_dict(data)
    except ConfigError:
        raise ConfigError(f"{path}: {error}" if path is not None else str(error)) from None
    raise ConfigError(f"command-line override ({' '.join(overrides or [])}): {error}") from None


def resolve_config_path(name: str) -> Path:
    """A config file path, or the name of a packaged config such as ``digits/default``."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / (name if name.endswith(".yaml") else f"{name}.yaml")
    if packaged.is_file():
        return packaged
    available = sorted(str(p.relative_to(PACKAGED_CONFIGS).with_suffix("")) for p in PACKAGED_CONFIGS.rglob("*.yaml"))
    raise ConfigError(f"config '{name}' is neither a file nor a packaged config ({', '.join(available)})")


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _validate_data(d: DataConfig, method: str) -> None:
    _check(len(d.crop_size) == 2 and all(v >= 1 for v in d.crop_size), "data.crop_size", "[height, width] >= 1",
           d.crop_size)
    _check(len(d.scale_range) == 2 and 0 < d.scale_range[0] <= d.scale_range[1], "data.scale_range",
           "[low, high] with 0 < low <= high", d.scale_range)
    _check(d.batch_size >= 1, "data.batch_size", ">= 1", d.batch_size)
    if method != "supervised":
        _check(d.unlabeled_batch_size >= 2, "data.unlabeled_batch_size", ">= 2 (unlabeled images are mixed in pairs)",
               d.unlabeled_batch_size)
    _check(d.num_workers >= 0, "data.num_workers", ">= 0", d.num_workers)
    _check(d.color_jitter >= 0, "data.color_jitter", ">= 0", d.color_jitter)
    _check(0 <= d.blur_prob <= 1, "data.blur_prob", "a probability in [0, 1]", d.blur_prob)
    _check(0 <= d.ignore_index <= 255, "data.ignore_index", "a label value in 0..255", d.ignore_index)
    g = d.digits
    _check(1 <= g.n_labeled <= g.n_train, "data.digits.n_labeled", f"1..n_train ({g.n_train})", g.n_labeled)
    _check(1 <= g.min_digits <= g.max_digits, "data.digits.min_digits", f"1..max_digits ({g.max_digits})", g.min_digits)
    _check(len(g.digit_scale) == 2 and 1 <= g.digit_scale[0] <= g.digit_scale[1]
           and 8 * g.digit_scale[1] <= g.image_size, "data.digits.digit_scale",
           f"[low, high] with 8 * high <= image_size ({g.image_size})", g.digit_scale)
    f = d.folder
    if d.name == "folder":
        _check(not 0 <= f.ignore_value < len(f.classes), "data.folder.ignore_value",
               f"a value that is no class index (classes are 0..{len(f.classes) - 1})", f.ignore_value)
    _check(0 <= f.val_fraction < 1, "data.folder.val_fraction", "a share in [0, 1)", f.val_fraction)
    for key, share in (("data.folder.labeled_fraction", f.labeled_fraction),
                       ("data.cityscapes.labeled_fraction", d.cityscapes.labeled_fraction)):
        _check(share is None or 0 < share <= 1, key, "None or a share in (0, 1]", share)
    c = d.cityscapes
    if d.name == "cityscapes":
        _check(d.ignore_index == 255, "data.ignore_index", "255 for Cityscapes (its train-id ignore value)",
               d.ignore_index)
    chosen = [k for k in ("split_dir", "labeled_fraction", "labeled_count") if getattr(c, k) is not None]
    _check(len(chosen) <= 1, "data.cityscapes", "at most one of split_dir, labeled_fraction, labeled_count", chosen)
    _check(c.labeled_count is None or c.labeled_count >= 1, "data.cityscapes.labeled_count", ">= 1", c.labeled_count)
    u = d.class_uniform
    _check(0 <= u.fraction <= 1, "data.class_uniform.fraction", "a share in [0, 1]", u.fraction)
    _check(u.tile_size >= 1, "data.class_uniform.tile_size", ">= 1", u.tile_size)


def _validate_method(m: MethodConfig) -> None:
    _check(m.n_boxes >= 1, "method.n_boxes", ">= 1", m.n_boxes)
    _check(1 <= m.last_boxes <= m.n_boxes, "method.last_boxes", f"1..method.n_boxes ({m.n_boxes})", m.last_boxes)
    _check(0 < m.box_area < 1, "method.box_area", "a share of the image in (0, 1)", m.box_area)
    _check(m.max_pairs is None or m.max_pairs >= 1, "method.max_pairs", "None (all pairs) or >= 1", m.max_pairs)
    _check(m.lambda_c >= 0, "method.lambda_c", ">= 0", m.lambda_c)
    _check(m.lambda_sc >= 0, "method.lambda_sc", ">= 0", m.lambda_sc)
    _check(0 <= m.ema_decay <= 1, "method.ema_decay", "a decay in [0, 1]", m.ema_decay)
    _check(m.relax_window >= 1 and m.relax_window % 2 == 1, "method.relax_window", "an odd integer >= 1",
           m.relax_window)
    _check(m.rampup_iters >= 0, "method.rampup_iters", ">= 0", m.rampup_iters)
    _check(m.unlabeled_start >= 0, "method.unlabeled_start", ">= 0", m.unlabeled_start)
    _check(m.confidence is None or 0 <= m.confidence < 1, "method.confidence",
           "None or a probability in [0, 1) (the teacher's top probability must exceed it)", m.confidence)
    _check(not m.sc_confident_only or m.confidence is not None, "method.sc_confident_only",
           "false while method.confidence is null (there is no mask to apply)", m.sc_confident_only)


def _validate_training(o: OptimConfig, t: TrainConfig, e: EvalConfig) -> None:
    _check(o.lr > 0, "optim.lr", "> 0", o.lr)
    _check(0 <= o.momentum < 1, "optim.momentum", "a value in [0, 1)", o.momentum)
    _check(o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
    _check(o.poly_power >= 0, "optim.poly_power", ">= 0", o.poly_power)
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)", o.betas)
    _check(o.head_lr_multiplier > 0, "optim.head_lr_multiplier", "> 0", o.head_lr_multiplier)
    for key in ("iterations", "grad_accum", "keep_last", "log_interval", "eval_interval", "checkpoint_interval"):
        _check(getattr(t, key) >= 1, f"train.{key}", ">= 1", getattr(t, key))
    _check(bool(_DEVICE.match(t.device)), "train.device", "auto, cpu, cuda or cuda:N", t.device)
    _check(t.threads is None or t.threads >= 1, "train.threads", "None or >= 1", t.threads)
    _check(t.prefetch != "on" or t.activation_checkpointing == "off", "train.prefetch",
           "auto or off with train.activation_checkpointing (its replay in the backward pass resets the random "
           "state that loading the next batches draws from)", t.prefetch)
    _check(len(e.scales) >= 1 and all(v > 0 for v in e.scales), "eval.scales", "a non-empty list of scales > 0",
           e.scales)
    _check(e.tile is None or (len(e.tile) == 2 and all(v >= 1 for v in e.tile)), "eval.tile",
           "None (whole image) or [height, width] >= 1", e.tile)
    _check(0 <= e.tile_overlap < 1, "eval.tile_overlap", "a share in [0, 1)", e.tile_overlap)
    _check(e.batch_size >= 1, "eval.batch_size", ">= 1", e.batch_size)
    _check(e.boundary_width >= 0, "eval.boundary_width", ">= 0 (0 turns boundary_miou off)", e.boundary_width)


def _validate_model(m: ModelConfig) -> None:
    from sclseg.models.registry import check_model_name  # the models import this module

    check_model_name(m.name, "model.name")


def validate(cfg: Config) -> None:
    """Ranges and cross-field checks the types alone cannot express, each naming its key.

    Runs once, when a config is loaded, before any data is touched.
    """
    _validate_model(cfg.model)
    _validate_data(cfg.data, cfg.method.name)
    _validate_method(cfg.method)
    _validate_training(cfg.optim, cfg.train, cfg.eval)
