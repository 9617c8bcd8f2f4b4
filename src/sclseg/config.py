"""Typed run configuration: dataclasses loaded from YAML, with ``key=value`` overrides.

Every hyper-parameter of the paper is a field here with the paper's value as its default, so
``configs/cityscapes/*.yaml`` only names the data and model. Unknown keys and values of the
wrong type are errors that name the key (and the nearest valid one).
"""

from __future__ import annotations

import copy
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
    "flatten_config",
    "apply_overrides",
    "resolve_config_path",
    "config_help",
]

PACKAGED_CONFIGS = Path(__file__).parent / "configs"

class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


def _help(text: str) -> dict:
    """A field's one-line meaning, as ``field(metadata=...)``: what ``sclseg config show`` and docs/config.md print."""
    return {"help": text}


@dataclass
class DigitsConfig:
    """The embedded digit-scenes dataset (see :mod:`sclseg.data.digits`)."""

    image_size: int = field(default=64, metadata=_help("side of the square digit scenes, in pixels"))
    n_train: int = field(default=2000, metadata=_help("scenes in the training pool (labeled + unlabeled)"))
    n_val: int = field(default=200, metadata=_help("scenes in the val split"))
    n_test: int = field(default=400, metadata=_help("scenes in the test split"))
    n_labeled: int = field(default=60,
        metadata=_help("labeled scenes taken from the training pool; the rest is unlabeled"))
    min_digits: int = field(default=2, metadata=_help("fewest digits per scene"))
    max_digits: int = field(default=4, metadata=_help("most digits per scene"))
    digit_scale: list[int] = field(default_factory=lambda: [3, 5],
        metadata=_help("[low, high] upscaling of the 8x8 digits"))
    seed: int = field(default=0, metadata=_help("seed of the generated scenes"))


@dataclass
class CityscapesConfig:
    """Cityscapes splits (see :mod:`sclseg.data.cityscapes` and docs/data.md)."""

    labeled: Literal["train", "trainval"] = field(default="train",
        metadata=_help("fine splits whose labels are used (trainval: the paper's Ours+)"))
    split_dir: Optional[str] = field(default=None,
        metadata=_help("UniMatch/CPS split folder with labeled.txt (+ unlabeled.txt), cwd- or root-relative"))
    labeled_fraction: Optional[float] = field(default=None,
        metadata=_help("keep this share of the fine pool labeled (seeded), hold back the rest"))
    labeled_count: Optional[int] = field(default=None,
        metadata=_help("or keep this many images labeled (372 = the community's 1/8)"))
    split_seed: int = field(default=0, metadata=_help("seed of labeled_fraction / labeled_count"))
    held_back_unlabeled: bool = field(default=True,
        metadata=_help("fine images whose labels are held back join the unlabeled pool"))
    extra_unlabeled: bool = field(default=True,
        metadata=_help("leftImg8bit/train_extra images join the unlabeled pool (coarse labels unused)"))


@dataclass
class FolderConfig:
    """A folder of images and index-PNG masks (see :mod:`sclseg.data.folder`)."""

    classes: list[str] = field(default_factory=list, metadata=_help("class names; mask value i is classes[i]"))
    colors: Optional[list[list[int]]] = field(default=None,
        metadata=_help("RGB per class for outputs; null: a default palette"))
    ignore_value: int = field(default=255,
        metadata=_help("mask value of unlabelled pixels (mapped to data.ignore_index)"))
    val_fraction: float = field(default=0.1,
        metadata=_help("share of images/ held out as val when ROOT/val/ is absent; 0: none"))
    labeled_fraction: Optional[float] = field(default=None,
        metadata=_help("keep this share of images/ labeled; the rest joins the unlabeled pool"))
    split_seed: int = field(default=0, metadata=_help("seed of val_fraction and labeled_fraction"))


@dataclass
class ClassUniformConfig:
    """Class-uniform sampling of labeled crops (Zhu et al.; see :mod:`sclseg.data.class_uniform`)."""

    enabled: bool = field(default=False, metadata=_help("class-uniform sampling of labeled crops (Zhu et al.)"))
    fraction: float = field(default=0.5,
        metadata=_help("share of labeled crops centred on a pixel of a uniformly chosen class"))
    tile_size: int = field(default=1024, metadata=_help("class centroids are computed per tile of this size"))
    cache_dir: Optional[str] = field(default=None,
        metadata=_help("where centroids and the data check's cache live; null: <data.root>/.sclseg_cache"))


@dataclass
class DataConfig:
    name: Literal["digits", "folder", "cityscapes"] = field(default="digits",
        metadata=_help("which dataset: the embedded digit scenes, a folder of images and masks, or Cityscapes"))
    root: Optional[str] = field(default=None,
        metadata=_help("folder of the dataset (folder, cityscapes); unused by digits"))
    crop_size: list[int] = field(default_factory=lambda: [64, 64],
        metadata=_help("[height, width] of the training crops"))
    batch_size: int = field(default=8, metadata=_help("labeled images per step, per process"))
    unlabeled_batch_size: int = field(default=8,
        metadata=_help("unlabeled images per step, per process (>= 2: they are mixed in pairs)"))
    num_workers: int = field(default=0,
        metadata=_help("data-loading worker processes (0: load in the training process)"))
    scale_range: list[float] = field(default_factory=lambda: [0.8, 1.25],
        metadata=_help("[low, high] random rescaling of training images before cropping"))
    hflip: bool = field(default=False, metadata=_help("random horizontal flips (off for digits: a mirrored 2 is no 2)"))
    color_jitter: float = field(default=0.3,
        metadata=_help("strength of the random brightness, contrast and saturation change"))
    blur_prob: float = field(default=0.3, metadata=_help("probability of a random Gaussian blur per image"))
    ignore_index: int = field(default=255, metadata=_help("label value of pixels that no loss or score counts"))
    digits: DigitsConfig = field(default_factory=DigitsConfig)
    cityscapes: CityscapesConfig = field(default_factory=CityscapesConfig)
    folder: FolderConfig = field(default_factory=FolderConfig)
    class_uniform: ClassUniformConfig = field(default_factory=ClassUniformConfig)


@dataclass
class ModelConfig:
    name: str = field(default="compact", metadata=_help(
        "a network of the model registry (sclseg.models.registry; docs/models.md): compact, deeplabv3plus_*, dpt_*"))
    output_stride: Literal[8, 16] = field(default=8,
        metadata=_help("encoder output stride of the DeepLabV3+ models (8 or 16)"))
    width: int = field(default=32, metadata=_help("base channel count of the compact model"))
    pretrained: Optional[str] = field(default=None, metadata=_help(
        "a local file of the whole network's or the encoder's weights, or imagenet / dinov2 / dinov3; null: none"))
    pretrained_weights: Literal["ema", "model"] = field(default="ema",
        metadata=_help("which weights of a file that holds both: ema (teacher) or model (student)"))


@dataclass
class MethodConfig:
    """The training method (``sclseg.methods``); defaults are the paper's values, and UniMatch's for
    the keys of the weak-to-strong methods."""

    name: str = field(default="scl", metadata=_help(
        "supervised, cl, scl, fixmatch, unimatch_v1, unimatch_v2, or one of the last three + _scl (docs/methods.md)"))
    n_boxes: int = field(default=32, metadata=_help("cl / scl: CutMix boxes per unlabeled pair (N)"))
    box_area: float = field(default=0.5, metadata=_help("cl / scl: share of the image the boxes cover together"))
    last_boxes: int = field(default=16, metadata=_help(
        "scl: boxes whose regions the structured loss uses, the last pasted (N_box)"))
    max_pairs: Optional[int] = field(default=9000, metadata=_help(
        "L_sc: pixel pairs sampled per region (N_pair); null: all pairs"))
    pair_sampling: Literal["pairs", "pixels"] = field(default="pairs", metadata=_help(
        "how L_sc samples regions with more than N_pair pairs: pairs or pixels (see losses)"))
    lambda_c: float = field(default=20.0, metadata=_help("cl / scl: weight of the consistency loss L_c"))
    lambda_sc: float = field(default=3.0, metadata=_help("weight of the structured consistency loss L_sc"))
    ema_decay: float = field(default=0.999, metadata=_help("decay of the EMA teacher"))
    teacher: Literal["ema", "student"] = field(default="ema", metadata=_help(
        "cl / scl: who predicts the guessed labels: ema, or the student (the EMA kept for evaluation only)"))
    relax_window: int = field(default=3, metadata=_help(
        "boundary label relaxation window of labeled_loss relaxed (1: plain cross-entropy)"))
    rampup_iters: int = field(default=0, metadata=_help(
        "sigmoid ramp-up of the unlabeled weight over this many steps (0: none, as the paper)"))
    unlabeled_start: int = field(default=0, metadata=_help(
        "supervised warm-up steps before the unlabeled terms start (their batches are skipped, not loaded)"))
    confidence: Optional[float] = field(default=None, metadata=_help(
        "cl / scl: L_c only where the teacher's top probability exceeds this; null: everywhere (the paper)"))
    sc_confident_only: bool = field(default=False, metadata=_help(
        "scl: L_sc only among the pixels the confidence mask keeps (false: every box pixel)"))
    labeled_loss: Literal["relaxed", "ce", "ohem"] = field(default="relaxed", metadata=_help(
        "loss of the labeled crops: relaxed (boundary relaxation, relax_window), ce, or ohem (UniMatch's)"))
    ohem_threshold: float = field(default=0.7, metadata=_help(
        "ohem: pixels whose own-class probability is at most this count ..."))
    ohem_min_kept: int = field(default=200000, metadata=_help(
        "ohem: ... or the min_kept hardest, when the threshold keeps fewer (0: no mining)"))
    threshold: float = field(default=0.95, metadata=_help(
        "fixmatch / unimatch: pseudo-labels where the teacher's top probability is at least this"))
    ema_warmup: Optional[bool] = field(default=None, metadata=_help(
        "EMA rate min(1 - 1/(t+1), ema_decay); null: the method's own (on for fixmatch, unimatch_v2)"))
    cutmix_prob: float = field(default=0.5, metadata=_help(
        "fixmatch / unimatch: probability that a strong view gets its CutMix box"))


@dataclass
class OptimConfig:
    lr: float = field(default=0.002, metadata=_help("initial learning rate"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum"))
    weight_decay: float = field(default=0.001, metadata=_help("weight decay"))
    poly_power: float = field(default=1.0,
        metadata=_help("power of the poly schedule lr * (1 - step / iterations) ** power"))
    nesterov: bool = field(default=False, metadata=_help("Nesterov momentum (SGD)"))
    name: Literal["sgd", "adamw"] = field(default="sgd",
        metadata=_help("optimizer: sgd (the paper) or adamw (UniMatch V2)"))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=_help("AdamW betas"))
    head_lr_multiplier: float = field(default=1.0,
        metadata=_help("lr factor of every parameter outside model.encoder (UniMatch V2: 40)"))


@dataclass
class TrainConfig:
    iterations: int = field(default=1000, metadata=_help("optimizer steps of the run"))
    eval_interval: int = field(default=500, metadata=_help("evaluate every this many steps (and at the end)"))
    log_interval: int = field(default=50, metadata=_help("write a metrics record every this many steps"))
    checkpoint_interval: int = field(default=500,
        metadata=_help("write step_N.pt every this many steps (and at the end)"))
    keep_last: int = field(default=2, metadata=_help("step_N.pt files kept (best.pt is kept apart)"))
    seed: int = field(default=0, metadata=_help("seed of the weights, the data order and the augmentations"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda, cuda:N or mps"))
    threads: Optional[int] = field(default=None, metadata=_help("torch intra-op threads on CPU; null: torch's default"))
    amp: Literal["off", "bf16", "fp16"] = field(default="off",
        metadata=_help("autocast dtype: off, bf16 or fp16 (fp16 adds loss scaling)"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches of data.batch_size per optimizer step"))
    activation_checkpointing: Literal["off", "encoder", "all"] = field(default="off",
        metadata=_help("recompute encoder blocks (all: and the decoder) in backward to save memory"))
    channels_last: bool = field(default=False, metadata=_help("NHWC memory format for the model and its inputs"))
    compile: bool = field(default=False,
        metadata=_help("torch.compile the student (slow first steps; mostly for GPUs)"))
    sync_bn: bool = field(default=True,
        metadata=_help("synchronize the student's BatchNorm statistics across processes (DDP)"))


@dataclass
class EvalConfig:
    split: str = field(default="val", metadata=_help("split scored during training and by evaluate"))
    use_teacher: bool = field(default=True, metadata=_help("score the EMA teacher (paper Table 3); false: the student"))
    scales: list[float] = field(default_factory=lambda: [1.0],
        metadata=_help("scales averaged at evaluation (multi-scale)"))
    flip: bool = field(default=False, metadata=_help("also average the horizontally flipped image"))
    tile: Optional[list[int]] = field(default=None,
        metadata=_help("[height, width] of sliding-window tiles; null: the whole image"))
    tile_overlap: float = field(default=1.0 / 3.0, metadata=_help("share by which neighbouring tiles overlap"))
    protocol: Literal["tiles", "unimatch_v1", "unimatch_v2"] = field(default="tiles",
        metadata=_help("window placement: tiles, or as UniMatch V1 / V2 (tile = window)"))
    batch_size: int = field(default=16, metadata=_help("images or tiles per forward pass at evaluation"))
    boundary_width: int = field(default=3,
        metadata=_help("boundary_miou scores pixels within this many pixels of a label edge; 0: off"))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


#: The one-line meaning of each :class:`MethodConfig` field (its fields carry no metadata); a new
#: field needs its line here, which a test checks.
def config_help() -> dict[str, str]:
    """``{"section.key": meaning}`` for every key of :class:`Config`, in declaration order."""

    def walk(cls: type, prefix: str) -> dict[str, str]:
        hints, out = typing.get_type_hints(cls), {}
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                out |= walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                out[f"{prefix}{f.name}"] = f.metadata.get("help", "")
        return out

    return walk(Config, "")


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


def flatten_config(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config dicts as ``{"section.key": value}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= flatten_config(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The one-line reason of a YAML error (its position and the problem, without the quoted text)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in lines:
                raise ConfigError(f"'{key}' is written twice (lines {lines[key]} and {key_node.start_mark.line + 1}); "
                                  "expected each section and key once")
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to nested dicts."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.iterations=100")
        key, raw = item.split("=", 1)
        try:
            value = yaml.load(raw, Loader=_StrictLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': the value is not valid YAML: {_yaml_problem(exc)}") from None
        _set_path(data, key.strip(), value)
    return data


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.load(path.read_text(), Loader=_StrictLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if data is None:
            raise ConfigError(f"{path}: the file is empty; expected sections such as data:, model:, method:, "
                              "train: (packaged examples: digits/default, folder/example)")
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



def _validate_data(d: DataConfig, needs_unlabeled: bool) -> None:
    _check(len(d.crop_size) == 2 and all(v >= 1 for v in d.crop_size), "data.crop_size", "[height, width] >= 1",
           d.crop_size)
    _check(len(d.scale_range) == 2 and 0 < d.scale_range[0] <= d.scale_range[1], "data.scale_range",
           "[low, high] with 0 < low <= high", d.scale_range)
    _check(d.batch_size >= 1, "data.batch_size", ">= 1", d.batch_size)
    if needs_unlabeled:
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
    from sclseg.methods import method_class  # the registry imports this module

    method_class(m.name)
    _check(0 <= m.threshold <= 1, "method.threshold", "a probability in [0, 1]", m.threshold)
    _check(0 <= m.ohem_threshold <= 1, "method.ohem_threshold", "a probability in [0, 1]", m.ohem_threshold)
    _check(m.ohem_min_kept >= 0, "method.ohem_min_kept", ">= 0", m.ohem_min_kept)
    _check(0 <= m.cutmix_prob <= 1, "method.cutmix_prob", "a probability in [0, 1]", m.cutmix_prob)
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
    from sclseg.device import DEVICE_NAMES, is_device_name  # it imports this module's ConfigError

    _check(o.lr > 0, "optim.lr", "> 0", o.lr)
    _check(0 <= o.momentum < 1, "optim.momentum", "a value in [0, 1)", o.momentum)
    _check(o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
    _check(o.poly_power >= 0, "optim.poly_power", ">= 0", o.poly_power)
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)", o.betas)
    _check(o.head_lr_multiplier > 0, "optim.head_lr_multiplier", "> 0", o.head_lr_multiplier)
    for key in ("iterations", "grad_accum", "keep_last", "log_interval", "eval_interval", "checkpoint_interval"):
        _check(getattr(t, key) >= 1, f"train.{key}", ">= 1", getattr(t, key))
    _check(is_device_name(t.device), "train.device", DEVICE_NAMES, t.device)
    _check(t.threads is None or t.threads >= 1, "train.threads", "None or >= 1", t.threads)
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
    _validate_method(cfg.method)
    from sclseg.methods import method_class

    _validate_data(cfg.data, method_class(cfg.method.name).needs_unlabeled)
    _validate_training(cfg.optim, cfg.train, cfg.eval)
