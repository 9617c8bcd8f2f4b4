"""Published files load exactly and the loaded networks compute what the references compute.

Each published layout is built here from the facts of the reference code (key names, shapes,
containers), filled with random weights; nothing is downloaded. The reference forward passes
below are written from the same facts with ``torch.nn.functional`` on those raw tensors, and the
sclseg models loaded from the files must give the same logits.

Facts (NVIDIA/semantic-segmentation, branch sdcnet: ``network/deepv3.py`` ``DeepWV3Plus``,
``network/wider_resnet.py`` ``WiderResNetA2``; LiheYoung/UniMatch: ``model/semseg/deeplabv3plus.py``,
``model/backbone/resnet.py``): see the two reference functions.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from sclseg.cli import _checkpoint_model, main
from sclseg.config import ConfigError, ModelConfig, load_config, resolve_config_path
from sclseg.data import build_data
from sclseg.engine.evaluation import evaluate_model
from sclseg.engine.trainer import Trainer
from sclseg.models import create_model
from sclseg.serialization import safe_load

from tiny_config import TINY

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
DIGIT_CLASSES = 11

State = dict[str, Tensor]
Shapes = dict[str, tuple[int, ...]]


# --------------------------------------------------------------------------- layouts from the facts


def _bn(shapes: Shapes, name: str, channels: int) -> None:
    for p in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{name}.{p}"] = (channels,)
    shapes[f"{name}.num_batches_tracked"] = ()


WRN_CHANNELS = [(128, 128), (256, 256), (512, 512), (512, 1024), (512, 1024, 2048), (1024, 2048, 4096)]
WRN_BLOCKS = [3, 3, 6, 3, 1, 1]


def nvidia_trunk_shapes() -> Shapes:
    """``WiderResNetA2`` (structure [3, 3, 6, 3, 1, 1]) without ``bn_out`` and classifier."""
    shapes: Shapes = {"mod1.conv1.weight": (64, 3, 3, 3)}
    cin = 64
    for m, (blocks, ch) in enumerate(zip(WRN_BLOCKS, WRN_CHANNELS), start=2):
        for b in range(1, blocks + 1):
            p = f"mod{m}.block{b}"
            _bn(shapes, f"{p}.bn1.0", cin)
            if len(ch) == 2:
                shapes[f"{p}.convs.conv1.weight"] = (ch[0], cin, 3, 3)
                _bn(shapes, f"{p}.convs.bn2.0", ch[0])
                shapes[f"{p}.convs.conv2.weight"] = (ch[1], ch[0], 3, 3)
            else:
                shapes[f"{p}.convs.conv1.weight"] = (ch[0], cin, 1, 1)
                _bn(shapes, f"{p}.convs.bn2.0", ch[0])
                shapes[f"{p}.convs.conv2.weight"] = (ch[1], ch[0], 3, 3)
                _bn(shapes, f"{p}.convs.bn3.0", ch[1])
                shapes[f"{p}.convs.conv3.weight"] = (ch[2], ch[1], 1, 1)
            strided = m == 4 and b == 1
            if strided or cin != ch[-1]:
                shapes[f"{p}.proj_conv.weight"] = (ch[-1], cin, 1, 1)
            cin = ch[-1]
    return shapes


def nvidia_head_shapes(classes: int) -> Shapes:
    shapes: Shapes = {}
    for i in range(4):
        shapes[f"aspp.features.{i}.0.weight"] = (256, 4096, 1, 1) if i == 0 else (256, 4096, 3, 3)
        _bn(shapes, f"aspp.features.{i}.1", 256)
    shapes["aspp.img_conv.0.weight"] = (256, 4096, 1, 1)
    _bn(shapes, "aspp.img_conv.1", 256)
    shapes["bot_fine.weight"] = (48, 128, 1, 1)
    shapes["bot_aspp.weight"] = (256, 1280, 1, 1)
    shapes["final.0.weight"] = (256, 304, 3, 3)
    _bn(shapes, "final.1", 256)
    shapes["final.3.weight"] = (256, 256, 3, 3)
    _bn(shapes, "final.4", 256)
    shapes["final.6.weight"] = (classes, 256, 1, 1)
    return shapes


UNIMATCH_LAYERS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def unimatch_backbone_shapes(depth: int) -> Shapes:
    """UniMatch's ``ResNet``: deep stem 3 -> 64 -> 64 -> 128, ``bn1``, Bottleneck layers, no ``fc``."""
    shapes: Shapes = {"conv1.0.weight": (64, 3, 3, 3), "conv1.3.weight": (64, 64, 3, 3),
                      "conv1.6.weight": (128, 64, 3, 3)}
    _bn(shapes, "conv1.1", 64)
    _bn(shapes, "conv1.4", 64)
    _bn(shapes, "bn1", 128)
    cin = 128
    for i, (blocks, planes) in enumerate(zip(UNIMATCH_LAYERS[depth], (64, 128, 256, 512)), start=1):
        for j in range(blocks):
            p = f"layer{i}.{j}"
            shapes[f"{p}.conv1.weight"] = (planes, cin, 1, 1)
            _bn(shapes, f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            _bn(shapes, f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (4 * planes, planes, 1, 1)
            _bn(shapes, f"{p}.bn3", 4 * planes)
            if j == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * planes, cin, 1, 1)
                _bn(shapes, f"{p}.downsample.1", 4 * planes)
            cin = 4 * planes
    return shapes


def unimatch_head_shapes(classes: int) -> Shapes:
    shapes: Shapes = {}
    for b in range(4):
        shapes[f"head.b{b}.0.weight"] = (256, 2048, 1, 1) if b == 0 else (256, 2048, 3, 3)
        _bn(shapes, f"head.b{b}.1", 256)
    shapes["head.b4.gap.1.weight"] = (256, 2048, 1, 1)
    _bn(shapes, "head.b4.gap.2", 256)
    shapes["head.project.0.weight"] = (256, 1280, 1, 1)
    _bn(shapes, "head.project.1", 256)
    shapes["reduce.0.weight"] = (48, 256, 1, 1)
    _bn(shapes, "reduce.1", 48)
    shapes["fuse.0.weight"] = (256, 304, 3, 3)
    _bn(shapes, "fuse.1", 256)
    shapes["fuse.3.weight"] = (256, 256, 3, 3)
    _bn(shapes, "fuse.4", 256)
    shapes["classifier.weight"] = (classes, 256, 1, 1)
    shapes["classifier.bias"] = (classes,)
    return shapes


def random_state(shapes: Shapes, seed: int) -> State:
    """Random tensors of ``shapes`` that keep activations of a deep network in a sane range."""
    g = torch.Generator().manual_seed(seed)
    state: State = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(int(torch.randint(1, 1000, (), generator=g)))
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean"):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # BN weight / bias, classifier bias
            base = 1.0 if key.endswith("weight") else 0.0
            state[key] = base + 0.1 * torch.randn(shape, generator=g)
        else:  # convolutions and linear layers, He-scaled
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


def n_params(shapes: Shapes) -> int:
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(buffers))


# --------------------------------------------------------------------------- reference forward passes


def _bn_f(x: Tensor, sd: State, p: str, relu: bool = True) -> Tensor:
    y = F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                     training=False, eps=1e-5)
    return F.relu(y) if relu else y


def _conv_f(x: Tensor, sd: State, p: str, stride: int = 1, dilation: int = 1) -> Tensor:
    w = sd[f"{p}.weight"]
    return F.conv2d(x, w, sd.get(f"{p}.bias"), stride, dilation * (w.shape[-1] // 2), dilation)


def _up(x: Tensor, size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def reference_deepwv3plus(sd: State, x: Tensor) -> Tensor:
    """NVIDIA's DeepWV3Plus on normalised images: dilated WRN38 A2 (stride 2 in mod4's first block;
    dilation 2 in mod5, 4 in mod6-7), raw mod7 output into ASPP (image pooling, 1x1, 3x3 at 12/24/36,
    concatenated in that order), plain 1x1 ``bot_aspp`` / ``bot_fine``, [fine, aspp] into ``final``,
    bilinear ``align_corners=True`` throughout."""
    size = x.shape[-2:]
    x = _conv_f(x, sd, "mod1.conv1")
    m2 = None
    for m, blocks in enumerate(WRN_BLOCKS, start=2):
        if m in (2, 3):
            x = F.max_pool2d(x, 3, 2, 1)
        dilation = {5: 2, 6: 4, 7: 4}.get(m, 1)
        for b in range(1, blocks + 1):
            p = f"mod{m}.block{b}"
            stride = 2 if (m == 4 and b == 1) else 1
            pre = _bn_f(x, sd, f"{p}.bn1.0")
            shortcut = _conv_f(pre, sd, f"{p}.proj_conv", stride) if f"{p}.proj_conv.weight" in sd else x
            if f"{p}.convs.conv3.weight" in sd:
                y = _conv_f(pre, sd, f"{p}.convs.conv1", stride)
                y = _conv_f(_bn_f(y, sd, f"{p}.convs.bn2.0"), sd, f"{p}.convs.conv2", dilation=dilation)
                y = _conv_f(_bn_f(y, sd, f"{p}.convs.bn3.0"), sd, f"{p}.convs.conv3")
            else:
                y = _conv_f(pre, sd, f"{p}.convs.conv1", stride, dilation)
                y = _conv_f(_bn_f(y, sd, f"{p}.convs.bn2.0"), sd, f"{p}.convs.conv2", dilation=dilation)
            x = y + shortcut
        if m == 2:
            m2 = x
    pooled = _bn_f(_conv_f(F.adaptive_avg_pool2d(x, 1), sd, "aspp.img_conv.0"), sd, "aspp.img_conv.1")
    branches = [_up(pooled, x.shape[-2:])]
    for i, rate in enumerate((1, 12, 24, 36)):
        branches.append(_bn_f(_conv_f(x, sd, f"aspp.features.{i}.0", dilation=rate), sd, f"aspp.features.{i}.1"))
    aspp = _up(_conv_f(torch.cat(branches, 1), sd, "bot_aspp"), m2.shape[-2:])
    y = torch.cat([_conv_f(m2, sd, "bot_fine"), aspp], 1)
    y = _bn_f(_conv_f(y, sd, "final.0"), sd, "final.1")
    y = _bn_f(_conv_f(y, sd, "final.3"), sd, "final.4")
    return _up(_conv_f(y, sd, "final.6"), size)


def reference_unimatch(sd: State, x: Tensor, depth: int, output_stride: int) -> Tensor:
    """UniMatch V1's DeepLabV3Plus on normalised images (keys without ``backbone.`` for the backbone)."""
    size = x.shape[-2:]
    x = _bn_f(_conv_f(x, sd, "conv1.0", 2), sd, "conv1.1")
    x = _bn_f(_conv_f(x, sd, "conv1.3"), sd, "conv1.4")
    x = F.max_pool2d(_bn_f(_conv_f(x, sd, "conv1.6"), sd, "bn1"), 3, 2, 1)
    dilate = {16: (False, False, True), 8: (False, True, True)}[output_stride]
    dilation = 1
    c1 = None
    for i, blocks in enumerate(UNIMATCH_LAYERS[depth], start=1):
        stride, previous = (1 if i == 1 else 2), dilation
        if i > 1 and dilate[i - 2]:
            dilation, stride = dilation * stride, 1
        for j in range(blocks):
            p = f"layer{i}.{j}"
            s, d = (stride, previous) if j == 0 else (1, dilation)
            y = _bn_f(_conv_f(x, sd, f"{p}.conv1"), sd, f"{p}.bn1")
            y = _bn_f(_conv_f(y, sd, f"{p}.conv2", s, d), sd, f"{p}.bn2")
            y = _bn_f(_conv_f(y, sd, f"{p}.conv3"), sd, f"{p}.bn3", relu=False)
            if j == 0:
                shortcut = _bn_f(_conv_f(x, sd, f"{p}.downsample.0", s), sd, f"{p}.downsample.1", relu=False)
            else:
                shortcut = x
            x = F.relu(y + shortcut)
        if i == 1:
            c1 = x
    rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
    feats = [_bn_f(_conv_f(x, sd, "head.b0.0"), sd, "head.b0.1")]
    feats += [_bn_f(_conv_f(x, sd, f"head.b{b}.0", dilation=r), sd, f"head.b{b}.1") for b, r in zip((1, 2, 3), rates)]
    pooled = _bn_f(_conv_f(F.adaptive_avg_pool2d(x, 1), sd, "head.b4.gap.1"), sd, "head.b4.gap.2")
    feats.append(_up(pooled, x.shape[-2:]))
    c4 = _up(_bn_f(_conv_f(torch.cat(feats, 1), sd, "head.project.0"), sd, "head.project.1"), c1.shape[-2:])
    y = torch.cat([_bn_f(_conv_f(c1, sd, "reduce.0"), sd, "reduce.1"), c4], 1)
    y = _bn_f(_conv_f(y, sd, "fuse.0"), sd, "fuse.1")
    y = _bn_f(_conv_f(y, sd, "fuse.3"), sd, "fuse.4")
    return _up(_conv_f(y, sd, "classifier"), size)


def assert_same_logits(ours: Tensor, ref: Tensor) -> None:
    """The acceptance criterion: within 1e-4 of the reference's largest logit, argmax on 99.9% of pixels."""
    assert ours.shape == ref.shape
    scale = ref.abs().max()
    assert (ours - ref).abs().max() <= 1e-4 * scale, float((ours - ref).abs().max() / scale)
    assert (ours.argmax(1) == ref.argmax(1)).float().mean() >= 0.999


def assert_bit_equal(model: torch.nn.Module, expected: State, to_own: Callable[[str], str]) -> None:
    own = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(own[to_own(key)], value), key


# --------------------------------------------------------------------------- NVIDIA's files


@pytest.fixture(scope="module")
def nvidia_files(tmp_path_factory):
    """NVIDIA's two files, 19 classes: ``wider_resnet38.pth.tar`` and ``cityscapes_best.pth``."""
    root = tmp_path_factory.mktemp("nvidia")
    trunk = random_state(nvidia_trunk_shapes(), seed=0)
    imagenet = {f"module.{k}": v for k, v in trunk.items()}
    imagenet |= {f"module.{k}": v for k, v in random_state(
        {"bn_out.0.weight": (4096,), "bn_out.0.bias": (4096,), "bn_out.0.running_mean": (4096,),
         "bn_out.0.running_var": (4096,), "bn_out.0.num_batches_tracked": (), "classifier.fc.weight": (1000, 4096),
         "classifier.fc.bias": (1000,)}, seed=1).items()}
    torch.save({"state_dict": imagenet, "epoch": 100, "arch": "wider_resnet38_a2"}, root / "wider_resnet38.pth.tar")
    del imagenet
    whole = random_state(nvidia_trunk_shapes() | nvidia_head_shapes(19), seed=2)
    torch.save({"state_dict": {f"module.{k}": v for k, v in whole.items()},
                "optimizer": {"state": {}, "param_groups": []},
                "epoch": 175, "mean_iu": np.float64(0.8312),
                "command": "python train.py --arch network.deepv3.DeepWV3Plus"},
               root / "cityscapes_best.pth")
    yield root, trunk, whole
    del trunk, whole
    gc.collect()


def _nvidia_to_own(key: str) -> str:
    return f"encoder.{key}" if key.startswith("mod") else key


@pytest.mark.slow
def test_nvidia_layout_is_the_model(nvidia_files):
    """Key names and shapes: the model's state_dict is DeepWV3Plus's, the trunk under ``encoder.``."""
    model = create_model(ModelConfig(name="deeplabv3plus_wrn38", output_stride=8), 19, load_pretrained=False)
    shapes = nvidia_trunk_shapes() | nvidia_head_shapes(19)
    assert ({k: tuple(v.shape) for k, v in model.state_dict().items()}
            == {_nvidia_to_own(k): s for k, s in shapes.items()})
    assert sum(p.numel() for p in model.parameters()) == n_params(shapes) == 137_103_936
    assert sum(p.numel() for p in model.encoder.parameters()) == n_params(nvidia_trunk_shapes()) == 105_062_720


@pytest.mark.slow
def test_nvidia_cityscapes_model_loads_whole_and_matches_the_reference(nvidia_files):
    root, _, whole = nvidia_files
    path = root / "cityscapes_best.pth"
    assert isinstance(safe_load(path)["mean_iu"], np.float64)
    model = create_model(ModelConfig(name="deeplabv3plus_wrn38", pretrained=str(path)), 19).eval()
    report = model.pretrained_report
    assert report.scope == "network" and report.missing == [] and report.unexpected == []
    assert_bit_equal(model, whole, _nvidia_to_own)
    torch.manual_seed(0)
    images = torch.rand(1, 3, 45, 61)
    with torch.no_grad():
        ours = model(images)
        ref = reference_deepwv3plus(whole, (images - MEAN) / STD)
    assert ours.shape == (1, 19, 45, 61)
    assert_same_logits(ours, ref)


def test_nvidia_imagenet_trunk_loads_the_encoder_only(nvidia_files):
    root, trunk, _ = nvidia_files
    model = create_model(ModelConfig(name="deeplabv3plus_wrn38"), 19, load_pretrained=False)
    head_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    with pytest.warns(UserWarning, match=r"ignored: bn_out\.\* \(5\), classifier\.\* \(2\)"):
        trunk_file = str(root / "wider_resnet38.pth.tar")
        model = create_model(ModelConfig(name="deeplabv3plus_wrn38", pretrained=trunk_file), 19)
    report = model.pretrained_report
    assert report.scope == "encoder" and report.missing == []
    assert len(report.loaded) == len(trunk)
    assert_bit_equal(model, trunk, _nvidia_to_own)
    assert sorted(report.unexpected) == sorted(["bn_out.0.weight", "bn_out.0.bias", "bn_out.0.running_mean",
                                                "bn_out.0.running_var", "bn_out.0.num_batches_tracked",
                                                "classifier.fc.weight", "classifier.fc.bias"])
    own = model.state_dict()
    assert set(head_before) == {k for k in own if not k.startswith("encoder.")}


def test_nvidia_file_read_by_evaluate(nvidia_files):
    """What ``sclseg evaluate CONFIG --checkpoint cityscapes_best.pth`` scores: the model of the
    config's ``model`` section with the classes of its data, every tensor from NVIDIA's file."""
    root, _, whole = nvidia_files
    cfg = load_config(resolve_config_path("digits/default"), ["model.name=deeplabv3plus_wrn38"])
    model, used_cfg, info = _checkpoint_model(str(root / "cityscapes_best.pth"), True, cfg, 19)
    assert used_cfg is cfg and info == {"num_classes": 19, "iteration": None, "published": True}
    assert_bit_equal(model, whole, _nvidia_to_own)


# --------------------------------------------------------------------------- UniMatch V1's files


def _unimatch_to_own(key: str) -> str:
    return f"encoder.{key[len('backbone.'):]}" if key.startswith("backbone.") else key


def unimatch_shapes(depth: int, classes: int) -> Shapes:
    return {f"backbone.{k}": s for k, s in unimatch_backbone_shapes(depth).items()} | unimatch_head_shapes(classes)


@pytest.mark.parametrize("depth, params", [(101, 59_467_571), (50, 40_475_443)])
def test_unimatch_layout_is_the_model(depth, params):
    model = create_model(ModelConfig(name=f"deeplabv3plus_resnet{depth}_deepstem", output_stride=16), 19)
    shapes = unimatch_shapes(depth, 19)
    assert ({k: tuple(v.shape) for k, v in model.state_dict().items()}
            == {_unimatch_to_own(k): s for k, s in shapes.items()})
    assert sum(p.numel() for p in model.parameters()) == n_params(shapes) == params


def _save_unimatch_checkpoint(path: Path, state: State) -> None:
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 239, "previous_best": np.float64(77.93)}, path)


@pytest.mark.parametrize("depth, output_stride, size",
                         [pytest.param(101, 16, (57, 77), marks=pytest.mark.slow), (50, 8, (33, 42))])
def test_unimatch_checkpoint_loads_whole_and_matches_the_reference(tmp_path, depth, output_stride, size):
    state = random_state(unimatch_shapes(depth, 19), seed=depth)
    path = tmp_path / "best.pth"
    _save_unimatch_checkpoint(path, state)
    cfg = ModelConfig(name=f"deeplabv3plus_resnet{depth}_deepstem", output_stride=output_stride, pretrained=str(path))
    model = create_model(cfg, 19).eval()
    assert model.pretrained_report.scope == "network" and not model.pretrained_report.unexpected
    assert_bit_equal(model, state, _unimatch_to_own)
    torch.manual_seed(1)
    images = torch.rand(1, 3, *size)
    flat = {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in state.items()}
    with torch.no_grad():
        ours = model(images)
        ref = reference_unimatch(flat, (images - MEAN) / STD, depth, output_stride)
    assert_same_logits(ours, ref)


@pytest.mark.slow
def test_unimatch_backbone_file_loads_the_encoder_bit_exactly(tmp_path):
    """UniMatch's ``pretrained/resnet101.pth``: the backbone's plain state dict."""
    backbone = random_state(unimatch_backbone_shapes(101), seed=7)
    path = tmp_path / "resnet101.pth"
    torch.save(backbone, path)
    model_cfg = ModelConfig(name="deeplabv3plus_resnet101_deepstem", output_stride=16, pretrained=str(path))
    model = create_model(model_cfg, 19)
    report = model.pretrained_report
    assert report.scope == "encoder" and report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(backbone)
    assert_bit_equal(model, backbone, lambda k: f"encoder.{k}")


def _digits(overrides: list[str]) -> list[str]:
    return [o for o in TINY if not o.startswith("model.")] + ["data.digits.n_val=2", *overrides]


@pytest.mark.slow
def test_unimatch_checkpoint_scored_by_evaluate(tmp_path):
    """``sclseg evaluate`` scores UniMatch's ``latest.pth`` as the model the config names, giving
    what the same weights loaded through ``model.pretrained`` give."""
    state = random_state(unimatch_shapes(50, DIGIT_CLASSES), seed=11)
    path = tmp_path / "latest.pth"
    _save_unimatch_checkpoint(path, state)
    overrides = _digits(["model.name=deeplabv3plus_resnet50_deepstem", "model.output_stride=16"])
    out = tmp_path / "eval.json"
    assert main(["evaluate", "digits/default", "--checkpoint", str(path), "--out", str(out), *overrides]) == 0
    result = json.loads(out.read_text())
    assert result["weights"] == "ema" and result["images"] == 2 and result["iteration"] is None

    cfg = load_config(resolve_config_path("digits/default"), overrides + [f"model.pretrained={path}"])
    data = build_data(cfg, for_training=False)
    again = evaluate_model(create_model(cfg.model, data.num_classes), data.eval_splits[cfg.eval.split], cfg.eval,
                           device=torch.device("cpu"))
    assert again["miou"] == result["miou"]


def test_training_starts_student_and_teacher_from_a_published_file(tmp_path):
    state = random_state(unimatch_shapes(50, DIGIT_CLASSES), seed=13)
    path = tmp_path / "best.pth"
    _save_unimatch_checkpoint(path, state)
    overrides = _digits(["model.name=deeplabv3plus_resnet50_deepstem", f"model.pretrained={path}", "train.device=cpu"])
    trainer = Trainer(load_config(resolve_config_path("digits/default"), overrides), tmp_path / "run",
                      show_progress=False)
    assert_bit_equal(trainer.student, state, _unimatch_to_own)
    assert_bit_equal(trainer.mean_teacher.teacher, state, _unimatch_to_own)


def test_published_file_for_the_wrong_network_is_an_error(tmp_path):
    state = random_state(unimatch_shapes(50, DIGIT_CLASSES), seed=5)
    path = tmp_path / "best.pth"
    _save_unimatch_checkpoint(path, state)
    overrides = _digits(["model.name=deeplabv3plus_resnet101_deepstem"])
    code = main(["evaluate", "digits/default", "--checkpoint", str(path), "--out", str(tmp_path / "e.json"),
                 *overrides])
    assert code == 2
    cfg = load_config(resolve_config_path("digits/default"), overrides)
    with pytest.raises(ConfigError,
                       match=r"--checkpoint: .*best\.pth lacks \d+ of the DeepStemDeepLabV3Plus network's"):
        _checkpoint_model(str(path), True, cfg, DIGIT_CLASSES)
