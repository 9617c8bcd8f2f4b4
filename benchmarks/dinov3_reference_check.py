"""Acceptance check: sclseg's DPT on DINOv3 against Meta's DINOv3 code under UniMatch V2's DPT head.

Both reference codes come from their own checkouts (not shipped with sclseg)::

    python benchmarks/dinov3_reference_check.py --dinov3 PATH/dinov3 --unimatch-v2 PATH/UniMatch-V2 \\
        --size small --out runs/dinov3_reference_small.json

Meta's ``dinov3_vit{s,b,l}16(pretrained=False)`` and UniMatch V2's ``DPTHead`` are built with random
weights (every tensor drawn again, Meta's key-bias mask and RoPE periods kept), composed as UniMatch
V2's ``DPT.forward`` composes them (patch 16 in place of 14), and saved as a UniMatch V2 checkpoint
(``{"model", "model_ema"}``, ``module.backbone.`` in Meta's names, ``module.head.``). sclseg loads the
file by ``model.pretrained`` and its logits on images in [0, 1] are compared with the reference's on
the normalised images, in eval mode, at several input sizes. Passing: the largest difference within
1e-4 of the largest logit magnitude and the same argmax on at least 99.9% of pixels. Exit status 1
when a size fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from sclseg.config import ModelConfig
from sclseg.models import create_model
from sclseg.models.deeplab import IMAGENET_MEAN, IMAGENET_STD
from sclseg.models.dpt import DPT_SIZES

HUB = {"small": "dinov3_vits16", "base": "dinov3_vitb16", "large": "dinov3_vitl16"}
TAPS = {"small": [2, 5, 8, 11], "base": [2, 5, 8, 11], "large": [4, 11, 17, 23]}


def randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Draw every floating tensor again (norm weights around 1), except Meta's fixed buffers."""
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if name.endswith(("bias_mask", "periods")) or not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            tensor.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.05 * noise)


def reference_network(size: str, num_classes: int, seed: int):
    """Meta's backbone and UniMatch V2's head, random, and the UniMatch V2 forward on normalised images."""
    from dinov3.hub import backbones
    from model.semseg.dpt import DPTHead

    backbone = getattr(backbones, HUB[size])(pretrained=False).eval()
    features, out_channels = DPT_SIZES[size]
    head = DPTHead(num_classes, backbone.embed_dim, features, False, out_channels=list(out_channels)).eval()
    generator = torch.Generator().manual_seed(seed)
    randomise(backbone, generator)
    randomise(head, generator)

    def forward(x: torch.Tensor) -> torch.Tensor:
        patch_h, patch_w = x.shape[-2] // 16, x.shape[-1] // 16
        tokens = backbone.get_intermediate_layers(x, n=TAPS[size], norm=True)
        out = head(tokens, patch_h, patch_w)
        return F.interpolate(out, (patch_h * 16, patch_w * 16), mode="bilinear", align_corners=True)

    return backbone, head, forward


def unimatch_v2_checkpoint(backbone: torch.nn.Module, head: torch.nn.Module) -> dict:
    network = {f"module.backbone.{k}": v.clone() for k, v in backbone.state_dict().items()}
    network |= {f"module.head.{k}": v.clone() for k, v in head.state_dict().items()}
    trained = {k: v + 0.01 if k.endswith("weight") else v for k, v in network.items()}  # differs from the EMA
    return {"model": trained, "model_ema": network, "epoch": 0}


def compare(ours: torch.Tensor, reference: torch.Tensor) -> dict:
    scale = reference.abs().max().item()
    diff = (ours - reference).abs().max().item()
    agree = (ours.argmax(1) == reference.argmax(1)).float().mean().item()
    return {"max_abs_diff": diff, "max_abs_logit": scale, "relative": diff / scale, "argmax_agreement": agree,
            "passed": diff <= 1e-4 * scale and agree >= 0.999}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dinov3", required=True, type=Path, help="a checkout of facebookresearch/dinov3")
    parser.add_argument("--unimatch-v2", required=True, type=Path, help="a checkout of LiheYoung/UniMatch-V2")
    parser.add_argument("--size", choices=list(HUB), default="small")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--inputs", default="224x224,160x320,96x144", help="comma-separated HxW, multiples of 16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(args.dinov3), str(args.unimatch_v2)]
    torch.manual_seed(args.seed)
    backbone, head, reference = reference_network(args.size, args.classes, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "latest.pth"
        torch.save(unimatch_v2_checkpoint(backbone, head), path)
        with warnings.catch_warnings():  # the ignored keys are reported in the results
            warnings.simplefilter("ignore")
            model = create_model(ModelConfig(name=f"dpt_dinov3_{args.size}", pretrained=str(path)), args.classes)
            trained = create_model(ModelConfig(name=f"dpt_dinov3_{args.size}", pretrained=str(path),
                                               pretrained_weights="model"), args.classes).eval()
    report = model.pretrained_report
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    results = {"size": args.size, "scope": report.scope, "ignored": report.unexpected, "inputs": {}}
    model.eval()
    for text in args.inputs.split(","):
        height, width = (int(v) for v in text.split("x"))
        images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(args.seed + height))
        with torch.no_grad():
            results["inputs"][text] = compare(model(images), reference((images - mean) / std))
            # the file's other (trained) network gives other logits: the comparison can fail
            results["inputs"][text]["trained_network_diff"] = (trained(images) - model(images)).abs().max().item()
    passed = report.scope == "network" and all(r["passed"] for r in results["inputs"].values())
    results["passed"] = passed
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
