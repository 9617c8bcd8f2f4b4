"""The packaged UniMatch-style Cityscapes recipes hold the numbers of UniMatch's own configs.

UniMatch V1 ``configs/cityscapes.yaml`` + ``unimatch.py``: crop 801, batch 2 per GPU on 4 GPUs, lr 0.005,
lr_multi 1, SGD momentum 0.9 / weight decay 1e-4, poly 0.9, 240 epochs, ResNet-101 with
``replace_stride_with_dilation [False, False, True]`` (output stride 16). UniMatch V2
``configs/cityscapes.yaml`` + ``unimatch_v2.py``: crop 798, batch 2 per GPU on 4 GPUs, lr 5e-6, lr_multi
40, AdamW betas (0.9, 0.999) / weight decay 0.01, poly 0.9, 180 epochs, EMA ratio capped at 0.996.
An epoch is one pass over the 2,603 unlabeled images of the 1/8 split: ``ceil(2603 / 4) // 2 = 325``
iterations per GPU.
"""

from __future__ import annotations

import math

from sclseg.config import load_config, resolve_config_path

ITERATIONS_PER_EPOCH = math.ceil((2975 - 372) / 4) // 2


def test_unimatch_v1_recipe() -> None:
    cfg = load_config(resolve_config_path("cityscapes/scl_resnet101_deepstem_1-8"))
    d, o = cfg.data, cfg.optim
    assert cfg.model.name == "deeplabv3plus_resnet101_deepstem" and cfg.model.output_stride == 16
    assert (d.crop_size, d.batch_size, d.unlabeled_batch_size, d.scale_range, d.hflip) == (
        [801, 801], 2, 2, [0.5, 2.0], True)
    assert (o.name, o.lr, o.head_lr_multiplier, o.momentum, o.weight_decay, o.poly_power) == (
        "sgd", 0.005, 1.0, 0.9, 1e-4, 0.9)
    assert cfg.train.iterations == 240 * ITERATIONS_PER_EPOCH == 78000
    assert cfg.data.cityscapes.labeled_count == 372 and not cfg.data.class_uniform.enabled
    assert (cfg.eval.protocol, cfg.eval.tile, cfg.eval.scales, cfg.eval.flip) == ("unimatch_v1", None, [1.0], False)
    assert cfg.method.name == "scl"


def test_unimatch_v2_recipe() -> None:
    cfg = load_config(resolve_config_path("cityscapes/scl_dpt_dinov2_base_1-8"))
    d, o = cfg.data, cfg.optim
    assert cfg.model.name == "dpt_dinov2_base" and cfg.model.pretrained_weights == "ema"
    assert (d.crop_size, d.batch_size, d.unlabeled_batch_size, d.scale_range, d.hflip) == (
        [798, 798], 2, 2, [0.5, 2.0], True)
    assert d.crop_size[0] % 14 == 0
    assert (o.name, o.lr, o.head_lr_multiplier, o.betas, o.weight_decay, o.poly_power) == (
        "adamw", 5e-6, 40.0, [0.9, 0.999], 0.01, 0.9)
    assert cfg.train.iterations == 180 * ITERATIONS_PER_EPOCH == 58500
    assert cfg.method.ema_decay == 0.996 and cfg.method.name == "scl"
    assert (cfg.eval.protocol, cfg.eval.tile, cfg.eval.scales, cfg.eval.flip) == ("unimatch_v2", None, [1.0], False)


def test_unimatch_v2_method_recipe_and_its_scl_twin() -> None:
    """UniMatch V2's own method: OHEM (thresh 0.7, min_kept 200,000), conf_thresh 0.95, the EMA rate
    min(1 - 1/(t+1), 0.996); the labeled and weak crops carry no colour augmentation (dataset/semi.py)."""
    plain = load_config(resolve_config_path("cityscapes/unimatch_v2_dinov2_base_1-8"))
    twin = load_config(resolve_config_path("cityscapes/unimatch_v2_scl_dinov2_base_1-8"))
    m = plain.method
    assert (m.name, m.labeled_loss, m.ohem_threshold, m.ohem_min_kept, m.threshold) == (
        "unimatch_v2", "ohem", 0.7, 200000, 0.95)
    assert (m.ema_decay, m.ema_warmup, m.cutmix_prob) == (0.996, True, 0.5)
    assert (plain.data.color_jitter, plain.data.blur_prob, plain.data.crop_size) == (0.0, 0.0, [798, 798])
    assert (plain.optim.name, plain.optim.lr, plain.optim.head_lr_multiplier) == ("adamw", 5e-6, 40.0)
    assert plain.train.iterations == 180 * ITERATIONS_PER_EPOCH
    assert (twin.method.name, twin.method.lambda_sc, twin.method.max_pairs) == ("unimatch_v2_scl", 3.0, 9000)
    differ = {k for k, v in vars(twin.method).items() if getattr(plain.method, k) != v}
    assert differ == {"name", "max_pairs"} or differ == {"name"}  # the twin changes nothing else
    assert (twin.data, twin.model, twin.optim, twin.train, twin.eval) == (
        plain.data, plain.model, plain.optim, plain.train, plain.eval)


def test_fixmatch_on_unimatch_v1s_resnet_recipe() -> None:
    cfg = load_config(resolve_config_path("cityscapes/fixmatch_resnet101_deepstem_1-8"))
    m, o = cfg.method, cfg.optim
    assert cfg.model.name == "deeplabv3plus_resnet101_deepstem" and cfg.model.output_stride == 16
    assert (m.name, m.labeled_loss, m.threshold, m.ema_decay, m.ema_warmup) == ("fixmatch", "ohem", 0.0, 0.996, True)
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.poly_power) == ("sgd", 0.005, 0.9, 1e-4, 0.9)
    assert cfg.train.iterations == 240 * ITERATIONS_PER_EPOCH and cfg.data.crop_size == [801, 801]
