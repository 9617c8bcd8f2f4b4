"""DPT on DINOv3: layout, parameter counts, Meta's and UniMatch V2's files, and the forward pass.

Facts from Meta's DINOv3 (``dinov3/hub/backbones.py``, ``models/vision_transformer.py``,
``layers/attention.py``, ``layers/rope_position_encoding.py``): the key names and shapes of
``dinov3_vit{s,b,l}16_pretrain_*.pth``, its parameter counts (21,601,152 for ViT-S/16 as Meta's code
builds it), the masked key bias, RoPE (base 100, coordinates ``2 * (i + 0.5) / n - 1`` per axis,
angles ``2 pi c / period``, ``rotate_half``) and the 1 + 4 leading tokens. The forward pass is
checked against that written out with plain tensor operations; Meta's own code is compared in
``benchmarks/dinov3_reference_check.py``. Nothing is downloaded: files are built here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sclseg.config import ConfigError, ModelConfig, load_config, resolve_config_path
from sclseg.models import create_model
from sclseg.models.dpt import DPT
from sclseg.models.weights import dinov3_from_meta

BLOCK_KEYS = {"norm1.weight": "d", "norm1.bias": "d", "attn.qkv.weight": "3d,d", "attn.qkv.bias": "3d",
              "attn.qkv.bias_mask": "3d", "attn.proj.weight": "d,d", "attn.proj.bias": "d", "ls1.gamma": "d",
              "norm2.weight": "d", "norm2.bias": "d", "mlp.fc1.weight": "4d,d", "mlp.fc1.bias": "4d",
              "mlp.fc2.weight": "d,4d", "mlp.fc2.bias": "d", "ls2.gamma": "d"}
SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def meta_shapes(dim: int, depth: int, heads: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of Meta's ``dinov3_vit*16`` ``state_dict`` (LVD-1689M files)."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim), "storage_tokens": (1, 4, dim), "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 16, 16), "patch_embed.proj.bias": (dim,),
        "rope_embed.periods": (dim // heads // 4,), "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(depth):
        for key, spec in BLOCK_KEYS.items():
            shapes[f"blocks.{i}.{key}"] = tuple(int(p[:-1] or 1) * dim for p in spec.split(","))
    return shapes


def key_mask(dim: int) -> torch.Tensor:
    """Meta's ``bias_mask`` of a qkv projection: 1 on the query and value thirds, 0 on the key third."""
    return torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])


def meta_state(dim: int, depth: int, heads: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors in Meta's layout, with Meta's key-bias mask and RoPE periods."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in meta_shapes(dim, depth, heads).items():
        if key.endswith("bias_mask"):
            state[key] = key_mask(dim)
        elif key.endswith("periods"):
            state[key] = 100.0 ** (2 * torch.arange(shape[0]) / (2 * shape[0]))
        elif key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = 0.05 * torch.randn(shape, generator=g)
    return state


def written_out_tokens(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int, layers) -> list[torch.Tensor]:
    """Meta's ``get_intermediate_layers(x, n=layers, norm=True)`` with plain tensor operations."""
    ln = lambda t, p: F.layer_norm(t, t.shape[-1:], state[f"{p}.weight"], state[f"{p}.bias"], eps=1e-5)  # noqa: E731
    patches = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16)
    grid_h, grid_w = patches.shape[-2:]
    batch, dim = x.shape[0], patches.shape[1]
    tokens = torch.cat([state["cls_token"].expand(batch, -1, -1), state["storage_tokens"].expand(batch, -1, -1),
                        patches.flatten(2).transpose(1, 2)], 1)
    head_dim = dim // heads
    periods = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    ys, xs = [(torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1 for n in (grid_h, grid_w)]
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)  # (h*w, 2): row, column
    angles = (2 * math.pi * coords[:, :, None] / periods).reshape(len(coords), -1).repeat(1, 2)  # (h*w, head_dim)

    def rope(t: torch.Tensor) -> torch.Tensor:
        first, second = t[..., 5:, :].chunk(2, -1)
        rotated = t[..., 5:, :] * angles.cos() + torch.cat([-second, first], -1) * angles.sin()
        return torch.cat([t[..., :5, :], rotated], -2)

    count = tokens.shape[1]
    outputs = []
    for i in range(max(layers) + 1):
        b = f"blocks.{i}"
        bias = state[f"{b}.attn.qkv.bias"] * state[f"{b}.attn.qkv.bias_mask"]
        qkv = F.linear(ln(tokens, f"{b}.norm1"), state[f"{b}.attn.qkv.weight"], bias)
        q, k, v = qkv.reshape(batch, count, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        attn = ((rope(q) * head_dim**-0.5) @ rope(k).transpose(-2, -1)).softmax(-1)
        mixed = (attn @ v).transpose(1, 2).reshape(batch, count, dim)
        tokens = tokens + state[f"{b}.ls1.gamma"] * F.linear(mixed, state[f"{b}.attn.proj.weight"],
                                                             state[f"{b}.attn.proj.bias"])
        hidden = F.gelu(F.linear(ln(tokens, f"{b}.norm2"), state[f"{b}.mlp.fc1.weight"], state[f"{b}.mlp.fc1.bias"]))
        tokens = tokens + state[f"{b}.ls2.gamma"] * F.linear(hidden, state[f"{b}.mlp.fc2.weight"],
                                                             state[f"{b}.mlp.fc2.bias"])
        if i in layers:
            outputs.append(ln(tokens, "norm")[:, 5:])
    return outputs


def unimatch_v2_file(backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A network under UniMatch V2's DDP names: ``module.backbone.*`` (Meta's keys) and ``module.head.*``."""
    return {**{f"module.backbone.{k}": v.clone() for k, v in backbone.items()},
            **{f"module.head.{k}": v.clone() for k, v in head.items()}}


def random_head(model: DPT, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in model.head.state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Meta's ViT-S/16 file and a UniMatch V2 checkpoint of DPT-S on DINOv3 (EMA and trained differ)."""
    folder = tmp_path_factory.mktemp("dinov3")
    with torch.device("meta"):
        shell = DPT("small", 19, family="dinov3")
    meta = meta_state(384, 12, 6, seed=1)
    torch.save(meta, folder / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    ema = {"backbone": meta_state(384, 12, 6, seed=2), "head": random_head(shell, 3)}
    trained = {"backbone": meta_state(384, 12, 6, seed=4), "head": random_head(shell, 5)}
    torch.save({"model": unimatch_v2_file(**trained), "model_ema": unimatch_v2_file(**ema), "optimizer": {},
                "epoch": 9, "previous_best": np.float64(1.5), "previous_best_ema": np.float64(2.5)},
               folder / "latest.pth")
    return {"meta_path": folder / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth", "meta": meta,
            "v2_path": folder / "latest.pth", "ema": ema, "trained": trained}


# ----------------------------------------------------------------------------- layout and counts

def test_meta_parameter_count_and_ours() -> None:
    """Meta's ViT-S/16 has 21,601,152 parameters; ours lacks the mask token and the masked key bias."""
    counts = {}
    for size, (dim, depth, heads) in SIZES.items():
        shapes = meta_shapes(dim, depth, heads)
        meta = sum(math.prod(s) for k, s in shapes.items() if not k.endswith(("bias_mask", "periods")))
        with torch.device("meta"):
            model = DPT(size, 19, family="dinov3")
        ours = sum(p.numel() for p in model.encoder.parameters())
        assert ours == meta - dim - depth * dim  # mask_token (D) and one key bias (D) per block
        counts[size] = meta
    assert counts["small"] == 21_601_152


@pytest.mark.parametrize("size", list(SIZES))
def test_metas_layout_maps_onto_the_encoder_key_for_key(size) -> None:
    dim, depth, heads = SIZES[size]
    with torch.device("meta"):
        model = DPT(size, 19, family="dinov3")
    tensors = {k: torch.empty(s, device="meta") for k, s in meta_shapes(dim, depth, heads).items()
               if not k.endswith("bias_mask")}
    tensors |= {f"blocks.{i}.attn.qkv.bias_mask": key_mask(dim) for i in range(depth)}
    converted = dinov3_from_meta(tensors)
    encoder = {k: tuple(v.shape) for k, v in model.encoder.state_dict().items()}
    ignored = {"mask_token", "rope_embed.periods"}
    assert set(converted) - ignored == set(encoder)
    assert all(tuple(converted[k].shape) == s for k, s in encoder.items())
    assert model.encoder.layers == ((4, 11, 17, 23) if size == "large" else (2, 5, 8, 11))
    assert model.encoder.patch_size == 16


def test_a_bias_mask_that_is_not_dinov3s_is_refused() -> None:
    with pytest.raises(ConfigError, match="blocks.0.attn.qkv.bias_mask"):
        dinov3_from_meta({"blocks.0.attn.qkv.bias": torch.zeros(6), "blocks.0.attn.qkv.bias_mask": torch.ones(6)})


# ----------------------------------------------------------------------------- published files

def test_metas_backbone_file_loads_and_reports_what_it_ignores(files) -> None:
    with pytest.warns(UserWarning, match="not in the encoder, ignored: mask_token, rope_embed.periods"):
        model = create_model(ModelConfig(name="dpt_dinov3_small", pretrained=str(files["meta_path"])), 19)
    report, meta = model.pretrained_report, files["meta"]
    assert report.scope == "encoder" and set(report.unexpected) == {"mask_token", "rope_embed.periods"}
    state = model.encoder.state_dict()
    assert torch.equal(state["reg_token"], meta["storage_tokens"])
    assert torch.equal(state["blocks.3.gamma_2"], meta["blocks.3.ls2.gamma"])
    q, _, v = meta["blocks.7.attn.qkv.bias"].chunk(3)
    assert torch.equal(state["blocks.7.attn.q_bias"], q) and torch.equal(state["blocks.7.attn.v_bias"], v)
    assert torch.equal(state["blocks.11.attn.qkv.weight"], meta["blocks.11.attn.qkv.weight"])


def test_encoder_tokens_equal_dinov3_written_out(files) -> None:
    with pytest.warns(UserWarning):
        model = create_model(ModelConfig(name="dpt_dinov3_small", pretrained=str(files["meta_path"])), 19).eval()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        ours = model.encoder(x)
        reference = written_out_tokens(files["meta"], x, 6, (2, 5, 8, 11))
    assert [t.shape for t in ours] == [(2, 3 * 5, 384)] * 4
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["ema", "model"])
def test_unimatch_v2_checkpoint_on_dinov3_loads_whole_the_ema_by_default(files, which) -> None:
    cfg = ModelConfig(name="dpt_dinov3_small", pretrained=str(files["v2_path"]), pretrained_weights=which)
    with pytest.warns(UserWarning, match="ignored"):
        model = create_model(cfg, 19).eval()
    expected = files["ema" if which == "ema" else "trained"]
    assert model.pretrained_report.scope == "network"
    assert torch.equal(model.encoder.state_dict()["reg_token"], expected["backbone"]["storage_tokens"])
    for key, value in expected["head"].items():
        assert torch.equal(model.head.state_dict()[key], value), key
    # the logits: the written-out encoder under the same head, on normalised images, upsampled as V2 does
    x = torch.rand(1, 3, 32, 48)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = written_out_tokens(expected["backbone"], (x - mean) / std, 6, (2, 5, 8, 11))
        reference = F.interpolate(model.head(tokens, 2, 3), size=(32, 48), mode="bilinear", align_corners=True)
        torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-4)


def test_sides_that_are_not_multiples_of_16_go_through_the_nearest_multiple() -> None:
    torch.manual_seed(0)
    model = DPT("small", 5, family="dinov3").eval()
    x = torch.rand(1, 3, 40, 57)  # int(40 / 16 + 0.5) = 3 patches, int(57 / 16 + 0.5) = 4
    with torch.no_grad():
        out = model(x)
        inner = model(F.interpolate(x, size=(48, 64), mode="bilinear", align_corners=True))
    assert out.shape == (1, 5, 40, 57)
    torch.testing.assert_close(out, F.interpolate(inner, size=(40, 57), mode="bilinear", align_corners=True))


def test_cityscapes_config_of_dinov3_base() -> None:
    cfg = load_config(resolve_config_path("cityscapes/unimatch_v2_dinov3_base_1-8"))
    assert cfg.model.name == "dpt_dinov3_base" and cfg.data.crop_size == [800, 800]
    assert all(side % 16 == 0 for side in cfg.data.crop_size + (cfg.eval.tile or []))


def test_complementary_dropout_reaches_the_dinov3_taps() -> None:
    """UniMatch V2's dropout on DPT-DINOv3: each view's logits are the head's on its own masked token
    maps, and the two views' masks complement each other."""
    from sclseg.methods.weak_strong import complementary_dropout

    torch.manual_seed(0)
    model = DPT("small", 3, family="dinov3").eval()
    images = torch.rand(4, 3, 32, 32)
    seen = []

    def dropout(features):
        out = complementary_dropout(features, torch.Generator().manual_seed(1))
        seen.append((features, out))
        return out

    with torch.no_grad():
        logits = model(images, perturb=dropout)
        (features, dropped), = seen
        by_hand = model.decode(dropped, (32, 32))
    assert logits.shape == (4, 3, 32, 32) and torch.equal(logits, by_hand)
    assert len(features) == 4 and all(f.shape == (4, 4, 384) for f in features)
    ratio = dropped[0] / features[0]
    assert torch.allclose(ratio[:2] + ratio[2:], torch.full_like(ratio[:2], 2.0))
