"""The digits encoder: pre-trained on train-pool crops only, and the packaged file the default config names."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from sclseg.config import ConfigError, ModelConfig, load_config, resolve_config_path
from sclseg.data.digits import digit_pools
from sclseg.digits_encoder import PretrainSettings, main, pretrain_encoder, render_digit_crops
from sclseg.models import create_model
from sclseg.models.weights import resolve_path

PACKAGED = "sclseg:weights/compact16_digit_crops.pt"


def test_crops_hold_one_train_pool_digit_each_in_pool_order():
    images, classes = render_digit_crops(2, crop_size=32, digit_scale=(3, 4))
    _ink, labels = digit_pools(0)["train"]
    assert images.shape == (2 * len(labels), 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(classes, torch.from_numpy(np.tile(labels, 2)).long())


def test_val_crops_come_from_the_val_pool():
    _images, classes = render_digit_crops(1, crop_size=32, digit_scale=(3, 4), pool="val")
    assert torch.equal(classes, torch.from_numpy(digit_pools(0)["val"][1]).long())


def test_pretraining_learns_and_its_encoder_loads_into_the_compact_model(tmp_path):
    settings = PretrainSettings(width=4, crop_size=32, renders_per_digit=1, digit_scale=(3, 4), steps=60, batch_size=32)
    state, report = pretrain_encoder(settings, log=None)
    assert report["settings"]["steps"] == 60
    assert report["train_accuracy"] > 0.2  # chance is 0.1
    path = tmp_path / "enc.pt"
    torch.save(state, path)
    model = create_model(ModelConfig(name="compact", width=4, pretrained=str(path)), 11)
    assert model.pretrained_report.scope == "encoder"
    for key, value in state.items():
        assert torch.equal(model.encoder.state_dict()[key], value)


def test_main_writes_the_weights_and_their_report(tmp_path, monkeypatch):
    def small(settings, log):  # the packaged settings with a smaller network and fewer crops
        small = replace(settings, width=4, crop_size=32, renders_per_digit=1, digit_scale=(3, 4))
        return pretrain_encoder(small, log=log)

    monkeypatch.setattr("sclseg.digits_encoder.pretrain_encoder", small)
    assert main(["--out", str(tmp_path / "w" / "enc.pt"), "--steps", "3"]) == 0
    assert (tmp_path / "w" / "enc.pt").is_file()
    assert json.loads((tmp_path / "w" / "enc.json").read_text())["settings"]["steps"] == 3


def test_the_default_config_starts_from_the_packaged_encoder():
    cfg = load_config(resolve_config_path("digits/default"))
    assert cfg.model.pretrained == PACKAGED
    model = create_model(cfg.model, 11)
    assert model.pretrained_report.scope == "encoder"
    report = json.loads(resolve_path(PACKAGED).with_suffix(".json").read_text())
    assert report["settings"]["width"] == cfg.model.width
    assert report["settings"]["data_seed"] == cfg.data.digits.seed  # same train pool as the scenes
    assert report["val_accuracy"] > 0.95


def test_a_missing_packaged_file_is_named():
    with pytest.raises(ConfigError, match="no_such.pt"):
        create_model(ModelConfig(name="compact", width=4, pretrained="sclseg:weights/no_such.pt"), 11)
