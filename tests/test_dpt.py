"""DPT on DINOv2 (UniMatch V2's network): layout, parameter counts, published files, position embedding.

Facts from UniMatch V2 (``model/semseg/dpt.py``, ``model/backbone/dinov2.py``, ``unimatch_v2.py``)
and Meta's DINOv2 (``interpolate_pos_encoding``): parameter counts for 19 classes, the key names
and shapes of Meta's ``dinov2_vit*14_pretrain.pth`` and of UniMatch V2's checkpoints, the blocks
the head reads, and the position-embedding resize. Nothing is downloaded: the files are built here
with random weights.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sclseg.config import ConfigError, ModelConfig
from sclseg.models import create_model
from sclseg.models.dinov2 import interpolate_pos_embed
from sclseg.models.dpt import DPT

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)

BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
              "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
              "mlp.fc2.bias", "ls2.gamma")


def meta_keys(depth: int) -> set[str]:
    """The keys of Meta's ``dinov2_vit*14_pretrain.pth``."""
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"}
    return keys | {f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS}


def unimatch_v2_head_shapes(classes: int, dim: int, features: int, out: tuple[int, ...]) -> dict[str, tuple]:
    """Key -> shape of UniMatch V2's ``DPTHead`` (``use_bn=False``)."""
    shapes: dict[str, tuple] = {}
    for i, c in enumerate(out):
        shapes[f"projects.{i}.weight"], shapes[f"projects.{i}.bias"] = (c, dim, 1, 1), (c,)
        shapes[f"scratch.layer{i + 1}_rn.weight"] = (features, c, 3, 3)
    shapes |= {"resize_layers.0.weight": (out[0], out[0], 4, 4), "resize_layers.0.bias": (out[0],),
               "resize_layers.1.weight": (out[1], out[1], 2, 2), "resize_layers.1.bias": (out[1],),
               "resize_layers.3.weight": (out[3], out[3], 3, 3), "resize_layers.3.bias": (out[3],)}
    for r in range(1, 5):
        block = f"scratch.refinenet{r}"
        shapes[f"{block}.out_conv.weight"], shapes[f"{block}.out_conv.bias"] = (features, features, 1, 1), (features,)
        for unit in (1, 2):
            for conv in (1, 2):
                shapes[f"{block}.resConfUnit{unit}.conv{conv}.weight"] = (features, features, 3, 3)
                shapes[f"{block}.resConfUnit{unit}.conv{conv}.bias"] = (features,)
    shapes |= {"scratch.output_conv.0.weight": (features, features, 3, 3), "scratch.output_conv.0.bias": (features,),
               "scratch.output_conv.2.weight": (classes, features, 1, 1), "scratch.output_conv.2.bias": (classes,)}
    return shapes


@pytest.fixture(scope="module")
def small() -> DPT:
    """DPT-S for 19 classes with every tensor random (position embedding and tokens included)."""
    torch.manual_seed(0)
    model = DPT("small", 19).eval()
    model.load_state_dict(randomised(model, 5))
    return model


def randomised(model: DPT, seed: int) -> dict[str, torch.Tensor]:
    """A random state for ``model`` (every tensor, position embedding and tokens included)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in model.state_dict().items()}


def unimatch_v2_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state under UniMatch V2's DDP names: ``module.backbone.*`` and ``module.head.*``."""
    return {"module." + ("backbone." + k[len("encoder."):] if k.startswith("encoder.") else k): v.clone()
            for k, v in state.items()}


# ----------------------------------------------------------------------------- layout and counts

def test_parameter_counts_are_unimatch_v2s() -> None:
    with torch.device("meta"):
        counts = {size: sum(p.numel() for p in DPT(size, 19).parameters()) for size in ("small", "base", "large")}
    assert counts == {"small": 24_795_507, "base": 97_528_531, "large": 335_578_643}


@pytest.mark.parametrize("size,dim,depth,features,out", [
    ("small", 384, 12, 64, (48, 96, 192, 384)),
    ("base", 768, 12, 128, (96, 192, 384, 768)),
    ("large", 1024, 24, 256, (256, 512, 1024, 1024)),
])
def test_keys_and_shapes_are_metas_and_unimatch_v2s(size, dim, depth, features, out) -> None:
    with torch.device("meta"):
        model = DPT(size, 19)
    encoder = {k: tuple(v.shape) for k, v in model.encoder.state_dict().items()}
    assert set(encoder) == meta_keys(depth)
    assert encoder["pos_embed"] == (1, 1 + 37 * 37, dim) and encoder["mask_token"] == (1, dim)
    assert encoder["patch_embed.proj.weight"] == (dim, 3, 14, 14)
    head_shapes = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
    assert head_shapes == unimatch_v2_head_shapes(19, dim, features, out)
    assert set(model.state_dict()) == {f"encoder.{k}" for k in encoder} | {f"head.{k}" for k in model.head.state_dict()}


def test_the_head_reads_blocks_2_5_8_11_or_4_11_17_23() -> None:
    with torch.device("meta"):
        assert DPT("small", 2).encoder.layers == (2, 5, 8, 11)
        assert DPT("base", 2).encoder.layers == (2, 5, 8, 11)
        assert DPT("large", 2).encoder.layers == (4, 11, 17, 23)


def test_exactly_the_tensors_without_gradient_are_frozen() -> None:
    """``mask_token`` and the coarsest fusion block's first unit never take part in the forward."""
    model = DPT("small", 3)
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(True)
    model(torch.rand(2, 3, 28, 42)).square().mean().backward()
    assert {k for k, p in model.named_parameters() if p.grad is None} == frozen
    assert frozen == {"encoder.mask_token"} | {f"head.scratch.refinenet4.resConfUnit1.conv{c}.{t}"
                                               for c in (1, 2) for t in ("weight", "bias")}


# ----------------------------------------------------------------------------- position embedding

def _cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _bicubic_matrix(source: int, target: int, scale: float) -> torch.Tensor:
    """``(target, source)`` weights of bicubic resampling by ``scale`` (half-pixel centres, clamped borders)."""
    weights = torch.zeros(target, source, dtype=torch.float64)
    for out in range(target):
        centre = (out + 0.5) / scale - 0.5
        base = math.floor(centre)
        for tap in range(base - 1, base + 3):
            weights[out, min(max(tap, 0), source - 1)] += _cubic(centre - tap)
    return weights


def dinov2_pos_embed_reference(pos_embed: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """DINOv2's formula written out: bicubic (a = -0.75) with scale factors (grid + 0.1) / M."""
    side = int(math.sqrt(pos_embed.shape[1] - 1))
    table = pos_embed[0, 1:].double().reshape(side, side, -1)
    rows = _bicubic_matrix(side, grid_h, (grid_h + 0.1) / side)
    cols = _bicubic_matrix(side, grid_w, (grid_w + 0.1) / side)
    resized = torch.einsum("ys,xt,std->yxd", rows, cols, table).reshape(grid_h * grid_w, -1)
    return torch.cat([pos_embed[0, :1].double(), resized])[None]


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (57, 57), (73, 146), (40, 37)])
def test_position_embedding_resize_is_dinov2s_formula(grid) -> None:
    torch.manual_seed(3)
    pos_embed = torch.randn(1, 1 + 37 * 37, 8)
    ours = interpolate_pos_embed(pos_embed, *grid)
    assert ours.shape == (1, 1 + grid[0] * grid[1], 8)
    torch.testing.assert_close(ours.double(), dinov2_pos_embed_reference(pos_embed, *grid), rtol=0, atol=2e-5)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (57, 57), (37, 20), (37, 37)])
def test_position_embedding_resize_traced_for_onnx_is_dinov2s_formula(grid, monkeypatch) -> None:
    """The form ``torch.export`` traces (matrix products, the grid symbolic) gives the same embeddings."""
    monkeypatch.setattr("sclseg.models.dinov2._exporting", lambda: True)
    torch.manual_seed(3)
    pos_embed = torch.randn(1, 1 + 37 * 37, 8)
    reference = pos_embed.double() if grid == (37, 37) else dinov2_pos_embed_reference(pos_embed, *grid)
    torch.testing.assert_close(interpolate_pos_embed(pos_embed, *grid).double(), reference, rtol=0, atol=2e-5)


def test_position_embedding_offset_matters_and_the_pretraining_grid_is_kept() -> None:
    torch.manual_seed(4)
    pos_embed = torch.randn(1, 1 + 37 * 37, 8)
    assert interpolate_pos_embed(pos_embed, 37, 37) is pos_embed
    ours = interpolate_pos_embed(pos_embed, 57, 57)
    # resizing to the output size (timm's way, and DINOv2's without the offset) gives other embeddings
    plain = F.interpolate(pos_embed[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2), size=(57, 57), mode="bicubic")
    plain = plain.permute(0, 2, 3, 1).reshape(1, -1, 8)
    assert (ours[:, 1:] - plain).abs().max() > 1e-3


# ----------------------------------------------------------------------------- forward

def dinov2_tokens_reference(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int, layers) -> list[torch.Tensor]:
    """Meta's ``get_intermediate_layers(x, layers, norm=True)`` written with plain tensor operations."""
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], state[f"{p}.weight"], state[f"{p}.bias"], eps=1e-6)  # noqa: E731
    tokens = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14)
    grid_h, grid_w = tokens.shape[-2:]
    tokens = torch.cat([state["cls_token"].expand(x.shape[0], -1, -1), tokens.flatten(2).transpose(1, 2)], 1)
    tokens = tokens + dinov2_pos_embed_reference(state["pos_embed"], grid_h, grid_w).float()
    batch, count, dim = tokens.shape
    outputs = []
    for i in range(max(layers) + 1):
        b = f"blocks.{i}"
        qkv = F.linear(ln(tokens, f"{b}.norm1"), state[f"{b}.attn.qkv.weight"], state[f"{b}.attn.qkv.bias"])
        q, k, v = qkv.reshape(batch, count, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        mixed = (attn @ v).transpose(1, 2).reshape(batch, count, dim)
        projected = F.linear(mixed, state[f"{b}.attn.proj.weight"], state[f"{b}.attn.proj.bias"])
        tokens = tokens + state[f"{b}.ls1.gamma"] * projected
        hidden = F.gelu(F.linear(ln(tokens, f"{b}.norm2"), state[f"{b}.mlp.fc1.weight"], state[f"{b}.mlp.fc1.bias"]))
        tokens = tokens + state[f"{b}.ls2.gamma"] * F.linear(hidden, state[f"{b}.mlp.fc2.weight"],
                                                             state[f"{b}.mlp.fc2.bias"])
        if i in layers:
            outputs.append(ln(tokens, "norm")[:, 1:])
    return outputs


def test_encoder_tokens_equal_dinov2_written_out(small: DPT) -> None:
    state = small.state_dict()
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        ours = small.encoder(x)
        reference = dinov2_tokens_reference({k[8:]: v for k, v in state.items() if k.startswith("encoder.")}, x, 6,
                                            (2, 5, 8, 11))
    assert [t.shape for t in ours] == [(2, 4 * 5, 384)] * 4
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_logits_at_input_size_and_other_sizes_go_through_the_nearest_multiple_of_14(small: DPT) -> None:
    with torch.no_grad():
        assert small(torch.rand(1, 3, 56, 56)).shape == (1, 19, 56, 56)
        x = torch.rand(1, 3, 50, 66)  # int(50 / 14 + 0.5) = 4 patches, int(66 / 14 + 0.5) = 5
        out = small(x)
        resized = F.interpolate(x, size=(56, 70), mode="bilinear", align_corners=True)
        expected = F.interpolate(small(resized), size=(50, 66), mode="bilinear", align_corners=True)
    assert out.shape == (1, 19, 50, 66)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_images_are_normalised_inside(small: DPT) -> None:
    """``DPT(x)`` is UniMatch V2's network applied to ``(x - mean) / std``: a constant image of the mean
    gives the same logits as a zero input to the un-normalised network."""
    x = MEAN.expand(1, 3, 28, 28).clone()
    with torch.no_grad():
        tokens = small.encoder(torch.zeros(1, 3, 28, 28))
        expected = F.interpolate(small.head(tokens, 2, 2), size=(28, 28), mode="bilinear", align_corners=True)
        torch.testing.assert_close(small(x), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- published files

@pytest.fixture(scope="module")
def files(small: DPT, tmp_path_factory) -> dict:
    """Meta's encoder file and a UniMatch V2 checkpoint, in their layouts, with random weights."""
    folder = tmp_path_factory.mktemp("published")
    meta = {k[len("encoder."):]: v for k, v in randomised(small, 10).items() if k.startswith("encoder.")}
    torch.save(meta, folder / "dinov2_vits14_pretrain.pth")
    trained, ema = randomised(small, 11), randomised(small, 12)
    checkpoint = {"model": unimatch_v2_state(trained), "model_ema": unimatch_v2_state(ema),
                  "optimizer": {"state": {}, "param_groups": []}, "epoch": 179,
                  "previous_best": np.float64(80.5), "previous_best_ema": np.float64(81.25),
                  "best_epoch": 170, "best_epoch_ema": 175}
    assert {"module.backbone.mask_token", "module.backbone.blocks.11.ls2.gamma",
            "module.head.scratch.output_conv.2.bias"} <= set(checkpoint["model_ema"])
    torch.save(checkpoint, folder / "best.pth")
    return {"meta": folder / "dinov2_vits14_pretrain.pth", "meta_state": meta, "v2": folder / "best.pth",
            "trained": trained, "ema": ema}


def test_metas_encoder_file_loads_bit_exactly(files) -> None:
    assert set(files["meta_state"]) == meta_keys(12)  # Meta's layout, mask_token included
    model = create_model(ModelConfig(name="dpt_dinov2_small", pretrained=str(files["meta"])), 19)
    assert model.pretrained_report.scope == "encoder"
    assert len(model.pretrained_report.loaded) == len(files["meta_state"]) and not model.pretrained_report.unexpected
    encoder = model.encoder.state_dict()
    for key, value in files["meta_state"].items():
        assert torch.equal(encoder[key], value), key


@pytest.mark.parametrize("which,expected", [("ema", "ema"), ("model", "trained")])
def test_unimatch_v2_checkpoint_loads_the_ema_by_default_the_trained_network_on_request(files, which, expected) -> None:
    cfg = ModelConfig(name="dpt_dinov2_small", pretrained=str(files["v2"]), pretrained_weights=which)
    model = create_model(cfg, 19)
    assert model.pretrained_report.scope == "network"
    state = model.state_dict()
    assert set(state) == set(files[expected])
    for key, value in files[expected].items():
        assert torch.equal(state[key], value), key


def test_a_checkpoint_for_other_classes_initialises_the_encoder_only(files) -> None:
    with pytest.warns(UserWarning, match="not in the encoder, ignored"):
        model = create_model(ModelConfig(name="dpt_dinov2_small", pretrained=str(files["v2"])), 21)
    report = model.pretrained_report
    assert report.scope == "encoder" and report.unexpected and all(k.startswith("head.") for k in report.unexpected)
    assert torch.equal(model.encoder.pos_embed, files["ema"]["encoder.pos_embed"])


def test_pretrained_weights_is_ema_or_model() -> None:
    from sclseg.config import load_config

    assert load_config(None, []).model.pretrained_weights == "ema"
    with pytest.raises(ConfigError, match="model.pretrained_weights"):
        load_config(None, ["model.pretrained_weights=student"])


# ----------------------------------------------------------------------------- evaluate and train from a V2 file

DIGIT_CLASSES = 11  # the packaged digits data: background + 10 digits


def _digits(overrides: list[str]) -> list[str]:
    from tiny_config import TINY

    return [o for o in TINY if not o.startswith("model.")] + ["data.digits.n_val=2", "model.name=dpt_dinov2_small",
                                                              *overrides]


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> dict:
    """A UniMatch V2 ``latest.pth`` of DPT-S for the digits classes (EMA and trained networks differ)."""
    torch.manual_seed(0)
    model = DPT("small", DIGIT_CLASSES)
    trained, ema = randomised(model, 21), randomised(model, 22)
    path = tmp_path_factory.mktemp("v2") / "latest.pth"
    torch.save({"model": unimatch_v2_state(trained), "model_ema": unimatch_v2_state(ema), "optimizer": {},
                "epoch": 3, "previous_best": np.float64(1.5), "previous_best_ema": np.float64(2.5),
                "best_epoch": 1, "best_epoch_ema": 2}, path)
    return {"path": path, "trained": trained, "ema": ema}


def test_evaluate_scores_a_unimatch_v2_checkpoint(digits_checkpoint, tmp_path) -> None:
    import json

    from sclseg.cli import _checkpoint_model, main
    from sclseg.config import load_config, resolve_config_path

    path, out = digits_checkpoint["path"], tmp_path / "eval.json"
    assert main(["evaluate", "digits/default", "--checkpoint", str(path), "--out", str(out), *_digits([])]) == 0
    result = json.loads(out.read_text())
    assert (result["weights"], result["images"], result["eval_mode"]) == ("ema", 2, "whole")
    # the network evaluate scores: the EMA one, or the trained one on request
    for which in ("ema", "model"):
        cfg = load_config(resolve_config_path("digits/default"), _digits([f"model.pretrained_weights={which}"]))
        model = _checkpoint_model(str(path), True, cfg, DIGIT_CLASSES)[0]
        expected = digits_checkpoint["ema" if which == "ema" else "trained"]
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_training_starts_from_the_ema_network_of_a_unimatch_v2_checkpoint(digits_checkpoint, tmp_path) -> None:
    from sclseg.config import load_config, resolve_config_path
    from sclseg.engine.trainer import Trainer

    overrides = _digits([f"model.pretrained={digits_checkpoint['path']}", "train.device=cpu", "optim.name=adamw",
                         "optim.head_lr_multiplier=40"])
    trainer = Trainer(load_config(resolve_config_path("digits/default"), overrides), tmp_path / "run",
                      show_progress=False)
    for network in (trainer.student, trainer.mean_teacher.teacher):
        state = network.state_dict()
        assert all(torch.equal(state[k], v) for k, v in digits_checkpoint["ema"].items())
    assert [len(g["params"]) for g in trainer.optimizer.param_groups] == [
        len(list(trainer.student.encoder.parameters())), len(list(trainer.student.head.parameters()))]
