"""Model builder: parameter counts against the references, output shapes and feature strides,
and loading weights from local files (never downloaded).

The Wider ResNet-38 DeepLabV3+ (137M parameters) is built once per module; its forward passes are
single small images in eval mode. The published files of NVIDIA and UniMatch, and the reference
forward passes, are in ``test_published_weights.py``.
"""

from __future__ import annotations

import gc
from unittest import mock

import pytest
import torch
import torchvision
from torch import nn

from sclseg.config import ConfigError, ModelConfig, load_config
from sclseg.models import MODEL_NAMES, PretrainedReport, create_model, load_encoder_weights
from sclseg.models.compact import CompactEncoder
from sclseg.models.resnet_deepstem import DeepStemDeepLabV3Plus
from sclseg.models.wrn38 import WRN38_CHANNELS, WRN38_STRUCTURE, WiderResNet38

NUM_CLASSES = 19
REFERENCE_WRN38_PARAMS = 137.1e6  # Zhu et al.'s DeepWV3Plus for 19 classes ("about 137.1M")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def no_download(*args, **kwargs):
    raise AssertionError("a model builder tried to download weights")


_NO_DOWNLOAD = [
    mock.patch("torch.hub.load_state_dict_from_url", no_download),
    mock.patch("torch.hub.download_url_to_file", no_download),
]


@pytest.fixture(scope="module")
def wrn38() -> nn.Module:
    with _NO_DOWNLOAD[0], _NO_DOWNLOAD[1]:
        model = create_model(ModelConfig(name="deeplabv3plus_wrn38", output_stride=8), NUM_CLASSES)
    yield model.eval()
    del model
    gc.collect()


def forward_with_features(model: nn.Module, x: torch.Tensor):
    """Logits and the encoder's (low, high) features of one eval-mode forward pass."""
    seen = {}
    handle = model.encoder.register_forward_hook(lambda m, i, out: seen.setdefault("features", out))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    return logits, seen["features"]


# --------------------------------------------------------------------------- names


def test_model_names_and_unknown_name_lists_them():
    assert {"compact", "deeplabv3plus_wrn38", "deeplabv3plus_resnet50", "deeplabv3plus_resnet101",
            "deeplabv3plus_resnet50_deepstem", "deeplabv3plus_resnet101_deepstem"} <= set(MODEL_NAMES)
    with pytest.raises(ConfigError) as info:
        create_model(ModelConfig(name="deeplabv3plus_resnet18"), NUM_CLASSES)
    for name in MODEL_NAMES:
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="num_classes"):
        create_model(ModelConfig(name="compact"), 0)
    # the config accepts exactly the names the builder knows, and names the key and the choices
    for name in MODEL_NAMES:
        assert load_config(None, [f"model.name={name}"]).model.name == name
    with pytest.raises(ConfigError, match="model.name: expected one of compact, .*dpt_dinov3_large, got 'resnet18'"):
        load_config(None, ["model.name=resnet18"])


# --------------------------------------------------------------------------- Wider ResNet-38


def reference_deepwv3plus_params(num_classes: int) -> int:
    """Zhu et al.'s DeepWV3Plus counted by hand from its public description.

    Trunk: 3x3 stem conv; pre-activation blocks (BN-ReLU, conv, BN-ReLU, conv[, BN-ReLU, conv]) with a
    1x1 projection where the shape changes; the trunk's final BN is not used by the segmentation model.
    Head: ASPP (image pooling + 1x1 + three 3x3, each conv-BN-ReLU), 1x1 projection 1280 -> 256 and
    128 -> 48 without BN, two 3x3 conv-BN-ReLU of 256, a 1x1 classifier without bias.
    """
    total, cin = 27 * 64, 64
    for mod, (n_blocks, ch) in enumerate(zip(WRN38_STRUCTURE, WRN38_CHANNELS)):
        for b in range(n_blocks):
            total += 2 * cin  # pre-activation BN
            if len(ch) == 2:
                total += 9 * cin * ch[0] + 2 * ch[0] + 9 * ch[0] * ch[1]
            else:
                total += cin * ch[0] + 2 * ch[0] + 9 * ch[0] * ch[1] + 2 * ch[1] + ch[1] * ch[2]
            if cin != ch[-1] or (b == 0 and mod == 2):  # mod4's first block is strided
                total += cin * ch[-1]
            cin = ch[-1]
    aspp = 2 * (4096 * 256 + 512) + 3 * (9 * 4096 * 256 + 512)
    decoder = 1280 * 256 + 128 * 48 + (9 * 304 * 256 + 512) + (9 * 256 * 256 + 512) + 256 * num_classes
    return total + aspp + decoder


def test_wrn38_parameter_count_matches_reference(wrn38):
    assert n_params(wrn38) == reference_deepwv3plus_params(NUM_CLASSES) == 137_103_936
    assert abs(n_params(wrn38) - REFERENCE_WRN38_PARAMS) / REFERENCE_WRN38_PARAMS < 5e-4  # "about 137.1M"
    assert n_params(wrn38.encoder) == 105_062_720  # no trunk-final BN: ASPP reads mod7's raw output


def test_wrn38_block_structure(wrn38):
    enc = wrn38.encoder
    assert isinstance(enc, WiderResNet38)
    assert (enc.low_channels, enc.high_channels) == (128, 4096)
    assert enc.mod1.conv1.weight.shape == (64, 3, 3, 3)
    expected_dilation = {2: 1, 3: 1, 4: 1, 5: 2, 6: 4, 7: 4}
    expected_dropout = {6: 0.3, 7: 0.5}
    cin = 64
    for i, (n_blocks, channels) in enumerate(zip(WRN38_STRUCTURE, WRN38_CHANNELS)):
        mod = getattr(enc, f"mod{i + 2}")
        assert len(mod) == n_blocks
        for b, block in enumerate(mod):
            convs = [m for m in block.convs if isinstance(m, nn.Conv2d)]
            assert [c.out_channels for c in convs] == list(channels)
            assert convs[0].in_channels == cin and isinstance(block.bn1[0], nn.BatchNorm2d)
            assert [c.kernel_size[0] for c in convs] == ([3, 3] if len(channels) == 2 else [1, 3, 1])
            strided = i + 2 == 4 and b == 0
            assert convs[0].stride == ((2, 2) if strided else (1, 1))
            assert max(c.dilation[0] for c in convs) == expected_dilation[i + 2]
            drops = [m for m in block.convs if isinstance(m, nn.Dropout2d)]
            assert [d.p for d in drops] == ([expected_dropout[i + 2]] if i + 2 in expected_dropout else [])
            assert (block.proj_conv is not None) == (cin != channels[-1] or strided)
            cin = channels[-1]
    # Zhu et al.'s head: no dropout; bot_fine and bot_aspp are plain 1x1 convolutions without bias.
    assert not any(isinstance(m, nn.Dropout) for m in wrn38.aspp.modules())
    for conv, shape in ((wrn38.bot_fine, (48, 128, 1, 1)), (wrn38.bot_aspp, (256, 1280, 1, 1))):
        assert isinstance(conv, nn.Conv2d) and conv.weight.shape == shape and conv.bias is None
    assert wrn38.final[-1].bias is None


def test_wrn38_os16_moves_the_stride_into_mod5_and_halves_dilations():
    enc = WiderResNet38(16)
    assert enc.mod4.block1.convs.conv1.stride == (2, 2)
    assert enc.mod5.block1.convs.conv1.stride == (2, 2) and enc.mod5.block1.convs.conv1.dilation == (1, 1)
    assert enc.mod6.block1.convs.conv2.dilation == (2, 2) and enc.mod7.block1.convs.conv2.dilation == (2, 2)
    assert n_params(enc) == 105_062_720
    with pytest.raises(ValueError):
        WiderResNet38(32)


def test_wrn38_key_names_follow_the_public_checkpoints(wrn38):
    shapes = {k: tuple(v.shape) for k, v in wrn38.encoder.state_dict().items()}
    assert shapes["mod1.conv1.weight"] == (64, 3, 3, 3)
    assert shapes["mod2.block1.bn1.0.weight"] == (64,)
    assert shapes["mod2.block1.convs.conv1.weight"] == (128, 64, 3, 3)
    assert shapes["mod2.block1.proj_conv.weight"] == (128, 64, 1, 1)
    assert shapes["mod4.block1.proj_conv.weight"] == (512, 256, 1, 1)
    assert shapes["mod6.block1.convs.bn3.0.running_var"] == (1024,)
    assert shapes["mod7.block1.convs.conv3.weight"] == (4096, 2048, 1, 1)
    assert "mod2.block2.proj_conv.weight" not in shapes
    assert not any(k.startswith(("bn_out.", "classifier.")) for k in shapes)  # not part of DeepWV3Plus


@pytest.mark.parametrize("output_stride", [8, 16])
def test_wrn38_output_size_and_feature_strides(wrn38, output_stride):
    model = wrn38
    if output_stride == 16:
        model = create_model(ModelConfig(name="deeplabv3plus_wrn38", output_stride=16), NUM_CLASSES).eval()
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    logits, (low, high) = forward_with_features(model, x)
    assert logits.shape == (1, NUM_CLASSES, 64, 64)
    assert torch.isfinite(logits).all()
    assert low.shape == (1, 128, 32, 32)  # mod2, stride 2
    assert high.shape == (1, 4096, 64 // output_stride, 64 // output_stride)
    aspp_rates = [b[0].dilation[0] for b in model.aspp.features[1:]]
    assert aspp_rates == ([12, 24, 36] if output_stride == 8 else [6, 12, 18])


def test_wrn38_weight_init_follows_the_reference(wrn38):
    """NVIDIA's ``initialize_weights(self.final)``: Kaiming-normal (fan-in); the rest PyTorch's
    defaults (Kaiming-uniform with a = sqrt(5): uniform within 1 / sqrt(fan_in))."""
    conv = wrn38.final[0]
    std = (2.0 / conv.weight[0].numel()) ** 0.5
    assert float(conv.weight.detach().std()) == pytest.approx(std, rel=0.02)
    weight = wrn38.bot_aspp.weight.detach()
    bound = 1.0 / weight[0].numel() ** 0.5
    assert float(weight.abs().max()) <= bound
    assert float(weight.std()) == pytest.approx(bound / 3**0.5, rel=0.02)


# --------------------------------------------------------------------------- deep-stem ResNet (UniMatch V1)


@pytest.mark.parametrize("output_stride", [16, 8])
def test_deepstem_dilation_follows_unimatch(output_stride):
    """``replace_stride_with_dilation`` [F, F, T] (OS 16) / [F, T, T] (OS 8): the first block of a
    dilated layer keeps the previous dilation, the stride sits on the 3x3 conv."""
    model = DeepStemDeepLabV3Plus(NUM_CLASSES, 50, output_stride)
    enc = model.encoder
    dilations = {name: [b.conv2.dilation[0] for b in getattr(enc, name)] for name in ("layer2", "layer3", "layer4")}
    strides = {name: getattr(enc, name)[0].conv2.stride[0] for name in ("layer2", "layer3", "layer4")}
    if output_stride == 16:
        assert dilations == {"layer2": [1] * 4, "layer3": [1] * 6, "layer4": [1, 2, 2]}
        assert strides == {"layer2": 2, "layer3": 2, "layer4": 1}
    else:
        assert dilations == {"layer2": [1] * 4, "layer3": [1] + [2] * 5, "layer4": [2, 4, 4]}
        assert strides == {"layer2": 2, "layer3": 1, "layer4": 1}
    assert all(b.conv1.stride == (1, 1) for layer in (enc.layer1, enc.layer2) for b in layer)
    assert [b[0].dilation[0] for b in (model.head.b1, model.head.b2, model.head.b3)] == (
        [6, 12, 18] if output_stride == 16 else [12, 24, 36])
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        c1, c4 = model.features(x)
        logits = model.eval()(x)
    assert c1.shape == (1, 256, 8, 12) and c4.shape == (1, 2048, 32 // output_stride, 48 // output_stride)
    assert logits.shape == (1, NUM_CLASSES, 32, 48)


# --------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize("depth", [50, 101])
def test_resnet_encoder_counts_equal_torchvision(depth):
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    with _NO_DOWNLOAD[0], _NO_DOWNLOAD[1]:
        model = create_model(ModelConfig(name=f"deeplabv3plus_resnet{depth}"), NUM_CLASSES)
    assert n_params(model.encoder) == n_params(reference) - n_params(reference.fc)
    assert n_params(model.encoder) == {50: 23_508_032, 101: 42_500_160}[depth]
    assert n_params(model) == {50: 40_351_667, 101: 59_343_795}[depth]
    # torchvision's names, minus the classifier: its ImageNet files load as they are.
    assert set(model.encoder.state_dict()) == {k for k in reference.state_dict() if not k.startswith("fc.")}


@pytest.mark.parametrize("depth,output_stride", [(50, 8), (50, 16)])
def test_resnet_output_size_and_feature_strides(depth, output_stride):
    model = create_model(ModelConfig(name=f"deeplabv3plus_resnet{depth}", output_stride=output_stride), 5).eval()
    x = torch.rand(2, 3, 64, 64)
    logits, (low, high) = forward_with_features(model, x)
    assert logits.shape == (2, 5, 64, 64)
    assert low.shape == (2, 256, 16, 16)  # layer1, stride 4
    assert high.shape == (2, 2048, 64 // output_stride, 64 // output_stride)
    aspp_rates = [b[0].dilation[0] for b in model.aspp.branches[1:]]
    assert aspp_rates == ([12, 24, 36] if output_stride == 8 else [6, 12, 18])


@pytest.mark.slow
def test_resnet_trains_on_odd_sizes():
    model = create_model(ModelConfig(name="deeplabv3plus_resnet50", output_stride=16), 3).train()
    x = torch.rand(2, 3, 37, 29)
    logits = model(x)
    assert logits.shape == (2, 3, 37, 29)
    logits.logsumexp(1).mean().backward()
    assert model.encoder.conv1.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- pretrained weights


def compact_cfg(path=None, width=8) -> ModelConfig:
    return ModelConfig(name="compact", width=width, pretrained=None if path is None else str(path))


def perturbed_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's state with every floating tensor changed, so that a load is visible."""
    torch.manual_seed(1)
    return {k: (v + torch.randn_like(v) if v.is_floating_point() else v + 3) for k, v in encoder.state_dict().items()}


def assert_loaded(encoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = encoder.state_dict()
    for key, value in state.items():
        assert torch.equal(own[key], value), key


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        lambda sd: {"model": {f"encoder.{k}": v for k, v in sd.items()}},
        lambda sd: {"state_dict": {f"module.encoder.{k}": v for k, v in sd.items()}},
    ],
    ids=["plain", "state_dict+module", "model+encoder", "module+encoder"],
)
def test_pretrained_round_trip_strips_prefixes(tmp_path, wrap):
    state = perturbed_state(CompactEncoder(8))
    path = tmp_path / "encoder.pth"
    torch.save(wrap(state), path)
    model = create_model(compact_cfg(path), 4)
    assert_loaded(model.encoder, state)
    assert isinstance(model.pretrained_report, PretrainedReport) and model.pretrained_report.scope == "encoder"
    assert sorted(model.pretrained_report.loaded) == sorted(f"encoder.{k}" for k in state)
    assert model.pretrained_report.missing == [] and model.pretrained_report.unexpected == []


def test_pretrained_whole_model_file_initialises_the_whole_network(tmp_path):
    source = create_model(compact_cfg(), 4)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / "whole.pt"
    torch.save({"model": state}, path)
    model = create_model(compact_cfg(path), 4)
    assert model.pretrained_report.scope == "network" and model.pretrained_report.unexpected == []
    assert_loaded(model, state)


def test_pretrained_whole_model_of_other_classes_loads_the_encoder_and_reports_the_rest(tmp_path):
    source = create_model(compact_cfg(), 7)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / "whole.pt"
    torch.save({"model": state}, path)
    with pytest.warns(UserWarning, match="not in the encoder, ignored") as record:
        model = create_model(compact_cfg(path), 4)
    assert model.pretrained_report.scope == "encoder"
    assert_loaded(model.encoder, {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")})
    assert "classifier.weight" in model.pretrained_report.unexpected
    message = str(record[0].message)
    assert "aspp.* (" in message and "classifier.* (2)" in message and "low_proj.* (" in message
    assert not torch.equal(model.aspp.pool[1][0].weight, state["aspp.pool.1.0.weight"])  # the head is not loaded


def test_pretrained_torchvision_file_loads_directly(tmp_path):
    """A torchvision ImageNet file (resnet50-*.pth): plain state_dict with ``fc.*`` and, in old
    files, no ``num_batches_tracked``."""
    reference = torchvision.models.resnet50(weights=None)
    state = {k: v for k, v in perturbed_state(reference).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "resnet50-0676ba61.pth"
    torch.save(state, path)
    with _NO_DOWNLOAD[0], _NO_DOWNLOAD[1], pytest.warns(UserWarning, match=r"ignored: fc\.\* \(2\)"):
        model = create_model(ModelConfig(name="deeplabv3plus_resnet50", pretrained=str(path)), NUM_CLASSES)
    assert_loaded(model.encoder, {k: v for k, v in state.items() if not k.startswith("fc.")})
    assert sorted(model.pretrained_report.unexpected) == ["fc.bias", "fc.weight"]
    assert model.pretrained_report.missing == []


def test_load_encoder_weights_of_a_standalone_encoder(tmp_path):
    """``load_encoder_weights(module, path)``: a whole sclseg model's file, its ``encoder.`` part."""
    source = create_model(compact_cfg(), 4)
    state = perturbed_state(source)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    encoder = CompactEncoder(8)
    with pytest.warns(UserWarning, match=r"not in the encoder, ignored: aspp\.\* \("):
        report = load_encoder_weights(encoder, path)
    assert report.scope == "encoder" and report.missing == []
    assert_loaded(encoder, {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})


def test_pretrained_missing_file_names_the_path(tmp_path):
    path = tmp_path / "weights" / "wider_resnet38.pth.tar"
    with pytest.raises(ConfigError, match="not found") as info:
        create_model(compact_cfg(path), 4)
    assert str(path) in str(info.value)
    # Restoring a checkpoint does not need the encoder file.
    model = create_model(compact_cfg(path), 4, load_pretrained=False)
    assert not hasattr(model, "pretrained_report")


def test_pretrained_wrong_shapes_are_an_error(tmp_path):
    path = tmp_path / "width16.pth"
    torch.save(CompactEncoder(16).state_dict(), path)
    with pytest.raises(ConfigError) as info:
        create_model(compact_cfg(path, width=8), 4)
    message = str(info.value)
    assert "do not fit" in message and "stem.0.0.weight: file (16, 3, 3, 3) vs encoder (8, 3, 3, 3)" in message


def test_pretrained_missing_tensors_are_an_error(tmp_path):
    state = CompactEncoder(8).state_dict()
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("stage4.")}, path)
    with pytest.raises(ConfigError, match=r"lacks \d+ of the DeepLabV3Plus encoder's tensors \(encoder\.stage4\."):
        create_model(compact_cfg(path), 4)


def test_pretrained_unrelated_file_is_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"backbone.weight": torch.zeros(3)}, path)
    with pytest.raises(ConfigError, match="no tensor .* matches"):
        create_model(compact_cfg(path), 4)
    torch.save({"epoch": 3, "state_dict": {"lr": 0.1}}, path)
    with pytest.raises(ConfigError, match="no tensors"):
        create_model(compact_cfg(path), 4)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        create_model(compact_cfg(path), 4)


class _Pickled:
    """An arbitrary object: ``torch.load(weights_only=True)`` must refuse to unpickle it."""


def test_pretrained_is_read_with_weights_only(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": CompactEncoder(8).state_dict(), "extra": _Pickled()}, path)
    with pytest.raises(ConfigError, match="weights_only"):
        create_model(compact_cfg(path), 4)


def test_pretrained_from_an_sclseg_training_checkpoint_takes_the_teacher(tmp_path):
    student = create_model(compact_cfg(), 4)
    teacher = perturbed_state(student)
    path = tmp_path / "last.pt"
    torch.save({"student": student.state_dict(), "teacher": teacher, "num_classes": 4, "iteration": 7}, path)
    model = create_model(compact_cfg(path), 4)
    assert model.pretrained_report.scope == "network"
    assert_loaded(model, teacher)
