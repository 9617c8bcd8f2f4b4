"""Activation checkpointing: the same outputs, gradients and BatchNorm statistics as without it
(the reference is the same network run plainly), dropout replayed, recomputation really done,
state_dict keys and the EMA teacher's copy untouched, for every model of the builder."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from sclseg.config import ConfigError, ModelConfig, config_from_dict
from sclseg.models import MODEL_NAMES, create_model
from sclseg.models.activation_checkpointing import apply_activation_checkpointing, checkpointed_units
from sclseg.models.deeplab import DeepLabV3Plus, Encoder
from sclseg.models.wrn38 import PreActBlock
from sclseg.teacher import MeanTeacher

MODES = ("encoder", "all")


class DropoutEncoder(Encoder):
    """WRN38-style pre-activation blocks with channel dropout inside the checkpointed blocks.

    A BatchNorm with ``momentum=None`` (cumulative average) sits in the last block, so that both
    running-average rules meet the recomputation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.low = nn.Sequential(PreActBlock(3, (8, 8), stride=2))
        self.high = nn.Sequential(
            PreActBlock(8, (16, 16), stride=2, dropout=0.5),
            PreActBlock(16, (8, 16, 16), dilation=2, dropout=0.5),
        )
        self.high[1].convs.bn2[0].momentum = None
        self.low_channels, self.high_channels = 8, 16

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low = self.low(x)
        return low, self.high(low)


def small_model() -> DeepLabV3Plus:
    """float64 DeepLabV3+ with dropout in the encoder blocks and after the ASPP (p=0.1)."""
    torch.manual_seed(0)
    model = DeepLabV3Plus(DropoutEncoder(), 5, aspp_rates=(1, 2), aspp_channels=8, low_level_channels=4,
                          decoder_channels=8, dropout=0.1)
    return model.double().train()


def fwd_bwd(model: nn.Module, images: Tensor, seed: int) -> Tensor:
    torch.manual_seed(seed)
    logits = model(images)
    (logits.square().mean() + logits[:, 0].sum()).backward()
    return logits.detach()


def batchnorm_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("mode", MODES)
def test_outputs_gradients_and_running_stats_equal_plain(mode):
    plain = small_model()
    ckpt = apply_activation_checkpointing(copy.deepcopy(plain), mode)
    images = torch.rand(3, 3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for step in range(2):  # two steps: running statistics build on their previous values
        out_plain, out_ckpt = fwd_bwd(plain, images, seed=10 + step), fwd_bwd(ckpt, images, seed=10 + step)
        torch.testing.assert_close(out_ckpt, out_plain, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")
    stats_plain, stats_ckpt = batchnorm_state(plain), batchnorm_state(ckpt)
    assert stats_plain.keys() == stats_ckpt.keys()
    for key in stats_plain:
        torch.testing.assert_close(stats_ckpt[key], stats_plain[key], rtol=0, atol=0, msg=key)
    counters = {int(v) for k, v in stats_ckpt.items() if k.endswith("num_batches_tracked")}
    assert counters == {2}  # one update per forward, two forwards


def test_dropout_is_active_so_the_replay_matters():
    model = small_model()
    images = torch.rand(2, 3, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(images)
        torch.manual_seed(1)
        b = model(images)
    assert (a - b).abs().max() > 1e-3  # different dropout masks give different logits


def conv_calls(model: nn.Module, conv: nn.Module, *, grad: bool) -> int:
    calls = []
    handle = conv.register_forward_hook(lambda *_: calls.append(1))
    images = torch.rand(2, 3, 24, 24, dtype=torch.float64)
    if grad:
        fwd_bwd(model, images, seed=0)
    else:
        with torch.no_grad():
            model(images)
    handle.remove()
    return len(calls)


def test_units_are_recomputed_in_backward_and_not_under_no_grad():
    plain = small_model()
    ckpt = apply_activation_checkpointing(copy.deepcopy(plain), "all")
    assert conv_calls(plain, plain.encoder.high[0].convs.conv1, grad=True) == 1
    assert conv_calls(ckpt, ckpt.encoder.high[0].convs.conv1, grad=True) == 2
    assert conv_calls(ckpt, ckpt.decoder[0][0], grad=True) == 2  # decoder: only with "all"
    assert conv_calls(ckpt, ckpt.encoder.high[0].convs.conv1, grad=False) == 1
    enc_only = apply_activation_checkpointing(copy.deepcopy(plain), "encoder")
    assert conv_calls(enc_only, enc_only.decoder[0][0], grad=True) == 1


def test_state_dict_keys_unchanged_and_interchangeable():
    plain = small_model()
    ckpt = apply_activation_checkpointing(copy.deepcopy(plain), "all")
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in ckpt.named_modules()] == [n for n, _ in plain.named_modules()]
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(ckpt.state_dict(), strict=True)


def test_idempotent_and_off_is_a_no_op():
    model = small_model()
    assert apply_activation_checkpointing(model, "off") is model
    assert not any("forward" in m.__dict__ for m in model.modules())
    apply_activation_checkpointing(model, "all")
    forwards = {id(m): m.__dict__["forward"] for m in model.modules() if "forward" in m.__dict__}
    apply_activation_checkpointing(model, "all")
    assert forwards == {id(m): m.__dict__["forward"] for m in model.modules() if "forward" in m.__dict__}
    assert len(forwards) == len(checkpointed_units(model, "all"))


def test_teacher_copy_runs_its_own_weights():
    student = apply_activation_checkpointing(small_model(), "all")
    teacher = MeanTeacher(student, decay=0.5).teacher
    for unit in checkpointed_units(teacher, "all"):
        assert unit.forward.__self__ is unit  # rebound to the copy, not to the student's module
    images = torch.rand(2, 3, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        before = teacher(images)
        for p in student.parameters():
            p.add_(1.0)
        torch.testing.assert_close(teacher(images), before, rtol=0, atol=0)


def test_bad_mode_and_model_without_encoder():
    with pytest.raises(ValueError, match="train.activation_checkpointing"):
        apply_activation_checkpointing(small_model(), "decoder")
    with pytest.raises(ValueError, match="no 'encoder'"):
        apply_activation_checkpointing(nn.Sequential(nn.Conv2d(3, 3, 1)), "encoder")
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        config_from_dict({"train": {"activation_checkpointing": "yes"}})
    assert config_from_dict({"train": {"activation_checkpointing": "all"}}).train.activation_checkpointing == "all"


# one DPT size per encoder stands for all three: the same blocks and head, only wider
@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n != "compact" and not n.endswith(("_base", "_large"))])
def test_every_paper_scale_model_has_blocks_in_encoder_and_decoder(name):
    model = create_model(ModelConfig(name=name), 19, load_pretrained=False)
    keys = list(model.state_dict())
    encoder_units = checkpointed_units(model, "encoder")
    all_units = checkpointed_units(model, "all")
    inside = {id(m) for m in model.encoder.modules()}
    assert len(encoder_units) >= 10 and all(id(u) in inside for u in encoder_units)
    extra = [u for u in all_units if id(u) not in inside]
    assert all_units[: len(encoder_units)] == encoder_units and extra
    assert all(id(u) not in inside for u in extra)
    apply_activation_checkpointing(model, "all")
    assert list(model.state_dict()) == keys


@pytest.mark.slow
def test_wrn38_gradients_with_its_dropout_equal_plain():
    """The paper's network (channel dropout 0.3/0.5 in mod6-7), two small images, float32."""
    torch.manual_seed(0)
    plain = create_model(ModelConfig(name="deeplabv3plus_wrn38"), 19, load_pretrained=False).train()
    ckpt = apply_activation_checkpointing(copy.deepcopy(plain), "all")
    images = torch.rand(2, 3, 16, 16)
    out_plain, out_ckpt = fwd_bwd(plain, images, seed=3), fwd_bwd(ckpt, images, seed=3)
    torch.testing.assert_close(out_ckpt, out_plain, rtol=1e-5, atol=1e-6)
    worst = max(
        ((q.grad - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
        for p, q in zip(plain.parameters(), ckpt.parameters())
    )
    assert worst < 1e-4
    for key, value in batchnorm_state(plain).items():
        torch.testing.assert_close(ckpt.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
