"""``model.pretrained: imagenet | dinov2 | dinov3``: resolved through timm's pretrained configs.

Nothing is downloaded: timm's two download functions are replaced by ones that fail as a machine
without a network does, and the weights come from a file built here and placed where
:func:`sclseg.models.pretrained.local_file` says (timm reads it through its file override).
"""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from sclseg.config import ConfigError, ModelConfig, load_config
from sclseg.models import create_model
from sclseg.models.pretrained import local_file
from sclseg.models.registry import MODELS

TAG = "vit_small_patch16_dinov3_qkvb.lvd1689m"


def offline(*args, **kwargs):
    raise OSError("network is unreachable")


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """An empty torch hub folder, and downloads that fail."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("timm.models._hub.hf_hub_download", offline)
    monkeypatch.setattr("timm.models._builder.load_state_dict_from_url", offline)


def test_every_vit_names_its_own_pretraining_and_the_resnets_imagenet() -> None:
    assert MODELS["dpt_dinov3_base"].pretrained == {"dinov3": "vit_base_patch16_dinov3_qkvb.lvd1689m"}
    assert MODELS["dpt_dinov2_large"].pretrained == {"dinov2": "vit_large_patch14_dinov2.lvd142m"}
    assert MODELS["deeplabv3plus_resnet101"].pretrained == {"imagenet": "resnet101.tv_in1k"}
    for entry in MODELS.values():
        for tag in entry.pretrained.values():
            assert timm.models.get_pretrained_cfg(tag) is not None, tag  # a tag timm knows


def test_offline_without_the_file_names_the_file_and_where_to_place_it(tmp_path) -> None:
    with pytest.raises(ConfigError) as info:
        create_model(ModelConfig(name="dpt_dinov3_small", pretrained="dinov3"), 5)
    message = str(info.value)
    assert "network is unreachable" in message and "timm/" + TAG in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / f"{TAG}.safetensors") in message


@pytest.mark.slow
def test_the_placed_file_initialises_the_encoder_through_timm(tmp_path) -> None:
    network = timm.create_model(TAG.split(".")[0], pretrained=False)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) for k, v in network.state_dict().items()}
    path = local_file(TAG)
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / f"{TAG}.safetensors"
    path.parent.mkdir(parents=True)
    save_file(state, str(path))
    model = create_model(ModelConfig(name="dpt_dinov3_small", pretrained="dinov3"), 5)
    report = model.pretrained_report
    assert report.scope == "encoder" and not report.missing and not report.unexpected
    encoder = model.encoder.state_dict()
    assert set(encoder) == set(state)
    assert all(torch.equal(encoder[k], v) for k, v in state.items())


def test_a_name_the_model_has_no_pretraining_for_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match="dpt_dinov3_small has no 'imagenet' pretraining .one of: dinov3"):
        create_model(ModelConfig(name="dpt_dinov3_small", pretrained="imagenet"), 5)
    with pytest.raises(ConfigError, match="compact has no 'dinov2' pretraining .no pretraining by name"):
        create_model(ModelConfig(name="compact", pretrained="dinov2"), 5)
    assert load_config(None, ["model.pretrained=imagenet"]).model.pretrained == "imagenet"
