"""Typed run configuration: dataclasses loaded from YAML, with ``key=value`` overrides.

Every hyper-parameter of the paper is a field here with the paper's value as its default, so
``configs/cityscapes/*.yaml`` only names the data and model. Unknown keys and values of the
wrong type are errors that name the key (and the nearest valid one).
"""

from __future__ import annotations

import dataclasses
import difflib
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
    name: str = "compact"  # compact | deeplabv3plus_wrn38 | deeplabv3plus_resnet50 | deeplabv3plus_resnet101
    output_stride: Literal[8, 16] = 8
    width: int = 32  # base channel count of the compact model
    pretrained: Optional[str] = None  # local file with encoder weights, never downloaded


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
    relax_window: int = 3  # boundary label relaxation window w (1 = plain CE)
    rampup_iters: int = 0  # sigmoid ramp-up of the unlabeled weight (0 = none, as in the paper)
    unlabeled_start: int = 0  # supervised warm-up steps before the unlabeled terms start (their unlabeled batches are skipped, not loaded)
    confidence: Optional[float] = None  # L_c only where the teacher's top probability exceeds this (None: everywhere, as the paper)


@dataclass
class OptimConfig:
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 0.001
    poly_power: float = 1.0
    nesterov: bool = False


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
    channels_last: bool = False  # NHWC memory format for the model and its inputs
    compile: bool = False  # torch.compile the student (slow first steps; mostly for GPUs)
    sync_bn: bool = True  # synchronize the student's BatchNorm statistics across processes (DDP)


@dataclass
class EvalConfig:
    split: str = "val"
    use_teacher: bool = True  # evaluate the EMA weights (paper Table 3)
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    tile: Optional[list[int]] = None  # sliding-window tile H, W; None = whole image
    tile_overlap: float = 1.0 / 3.0
    batch_size: int = 16


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
    data = apply_overrides(data, overrides or [])
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


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


def validate(cfg: Config) -> None:
    """Cross-field checks the types alone cannot express."""
    m = cfg.method
    if m.last_boxes > m.n_boxes:
        raise ConfigError(f"method.last_boxes ({m.last_boxes}) must be <= method.n_boxes ({m.n_boxes})")
    if m.relax_window < 1 or m.relax_window % 2 == 0:
        raise ConfigError(f"method.relax_window must be an odd integer >= 1, got {m.relax_window}")
    if not 0.0 <= m.ema_decay <= 1.0:
        raise ConfigError(f"method.ema_decay must be in [0, 1], got {m.ema_decay}")
    if m.name != "supervised" and cfg.data.unlabeled_batch_size < 2:
        raise ConfigError("data.unlabeled_batch_size must be >= 2: unlabeled images are mixed in pairs")
    if len(cfg.data.crop_size) != 2:
        raise ConfigError(f"data.crop_size must be [height, width], got {cfg.data.crop_size}")
    if cfg.train.iterations < 1:
        raise ConfigError(f"train.iterations must be >= 1, got {cfg.train.iterations}")
