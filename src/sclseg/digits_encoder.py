"""Pre-train the compact encoder of the embedded default on single digits, as ImageNet is to Cityscapes.

The segmentation networks of the field start from an encoder pre-trained on a classification
set. The embedded default does the same at its own scale: the compact encoder learns to name the
digit in a crop holding one digit of the *train* pool (``sclseg.data.digits``), rendered as the
scenes render it (textured background, contrasting colour, the class's stroke pattern, 3-5x
scale, random position). The val and test digit instances are never seen. The packaged file
``sclseg/weights/compact16_digit_crops.pt`` was written by::

    python -m sclseg.digits_encoder --out src/sclseg/weights/compact16_digit_crops.pt

(``make digits-encoder``) and a config names it as ``model.pretrained:
sclseg:weights/compact16_digit_crops.pt``. Rebuilding it on another machine gives other weights
within float noise of these; the run is seeded and single-threaded.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sclseg.data.digits import digit_pools, render_scene
from sclseg.models.compact import CompactEncoder
from sclseg.models.deeplab import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["PretrainSettings", "render_digit_crops", "DigitClassifier", "pretrain_encoder", "main"]


@dataclass
class PretrainSettings:
    """What :func:`pretrain_encoder` trains; the defaults made the packaged file."""

    width: int = 16
    output_stride: int = 8
    crop_size: int = 40
    renders_per_digit: int = 8  # crops drawn per train-pool digit instance
    digit_scale: tuple[int, int] = (3, 5)
    data_seed: int = 0  # data.digits.seed: which instances form the train pool
    steps: int = 2000
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    threads: int = 1


def render_digit_crops(
    renders_per_digit: int, *, crop_size: int = 40, digit_scale: tuple[int, int] = (3, 5), data_seed: int = 0,
    pool: str = "train", seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Crops of one digit each from ``pool``: uint8 images ``(N, 3, S, S)`` and digit classes ``(N,)`` in 0..9.

    ``N = renders_per_digit x`` the pool's size; each crop is one scene of ``render_scene`` with
    exactly one digit, so its look is the scenes' look.
    """
    ink, labels = digit_pools(data_seed)[pool]
    rng = np.random.default_rng([seed, crop_size, renders_per_digit])
    images, classes = [], []
    for _ in range(renders_per_digit):
        for k in range(len(ink)):
            image, _mask = render_scene(rng, ink[k : k + 1], labels[k : k + 1], crop_size, (1, 1), digit_scale)
            images.append(image)
            classes.append(int(labels[k]))
    return torch.from_numpy(np.stack(images)), torch.tensor(classes)


class DigitClassifier(nn.Module):
    """The compact encoder, global average pooling of its stride-8 features, and a linear layer.

    Maps images ``(B, 3, H, W)`` in ``[0, 1]`` to logits ``(B, 10)``, normalised as
    :class:`~sclseg.models.deeplab.DeepLabV3Plus` normalises them, so the encoder's weights mean
    the same in both.
    """

    def __init__(self, width: int, output_stride: int) -> None:
        super().__init__()
        self.encoder = CompactEncoder(width, output_stride)  # type: ignore[arg-type]
        self.fc = nn.Linear(self.encoder.high_channels, 10)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        _low, high = self.encoder((images - self.mean) / self.std)
        return self.fc(high.mean(dim=(2, 3)))


def _accuracy(model: nn.Module, images: Tensor, classes: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(
            int((model(images[i : i + 256].float() / 255).argmax(1) == classes[i : i + 256]).sum())
            for i in range(0, len(images), 256)
        )
    model.train()
    return hits / len(images)


def pretrain_encoder(settings: PretrainSettings, *,
                     log: Optional[Callable[[str], None]] = print) -> tuple[dict[str, Tensor], dict]:
    """Train :class:`DigitClassifier` on train-pool crops; return the encoder's state_dict and a report.

    SGD with momentum and a poly (power 1) learning rate; each step draws ``batch_size`` of the
    rendered crops at random. The report holds the settings and the accuracy on the train
    crops and on val-pool crops (the latter only as a check that the encoder generalises: it picks
    nothing).
    """
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    images, classes = render_digit_crops(
        settings.renders_per_digit, crop_size=settings.crop_size, digit_scale=settings.digit_scale,
        data_seed=settings.data_seed,
    )
    model = DigitClassifier(settings.width, settings.output_stride)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    generator = torch.Generator().manual_seed(settings.seed)
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * (1 - step / settings.steps)
        pick = torch.randint(len(images), (settings.batch_size,), generator=generator)
        batch = images[pick].float() / 255
        loss = F.cross_entropy(model(batch), classes[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log is not None and (step + 1) % 200 == 0:
            log(f"step {step + 1}/{settings.steps} loss {loss.item():.4f}")
    val_images, val_classes = render_digit_crops(
        1, crop_size=settings.crop_size, digit_scale=settings.digit_scale, data_seed=settings.data_seed, pool="val"
    )
    report = {
        "settings": asdict(settings),
        "train_accuracy": _accuracy(model, images, classes),
        "val_accuracy": _accuracy(model, val_images, val_classes),
    }
    return model.encoder.state_dict(), report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sclseg.digits_encoder", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="weights file to write (the encoder's state_dict)")
    parser.add_argument("--steps", type=int, default=PretrainSettings.steps)
    args = parser.parse_args(argv)
    state, report = pretrain_encoder(PretrainSettings(steps=args.steps), log=print)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
