"""The optimizers: SGD unchanged, AdamW and the head lr multiplier as UniMatch V2 builds them.

UniMatch V2 (``unimatch_v2.py``): ``AdamW([{backbone params, lr}, {the other params, lr * lr_multi}],
betas=(0.9, 0.999), weight_decay=0.01)``, both groups' lr set by hand to ``lr * (1 - iters / total_iters)
** 0.9`` (times ``lr_multi`` for the head). The reference below sets it as our schedule does, from the
step about to be taken (UniMatch uses the step just taken: one step behind).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sclseg.config import ConfigError, load_config
from sclseg.engine.optim import build_optimizer, parameter_groups
from sclseg.models import create_model


def compact(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(load_config(None, ["model.width=8"]).model, 3)


def train(model: nn.Module, optimizer, scheduler, steps: int = 3) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        images, target = torch.rand(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), target).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.slow
def test_sgd_over_the_model_is_sgd_over_its_parameters_bit_for_bit() -> None:
    cfg = load_config(None, ["optim.poly_power=0.9"]).optim
    a, b = compact(), compact()
    train(a, *build_optimizer(a, cfg, iterations=10))
    train(b, *build_optimizer(b.parameters(), cfg, iterations=10))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_adamw_with_head_multiplier_is_unimatch_v2s_optimizer() -> None:
    lr, multi, total = 5e-6, 40.0, 10
    cfg = load_config(None, ["optim.name=adamw", f"optim.lr={lr}", "optim.weight_decay=0.01",
                             f"optim.head_lr_multiplier={multi}", "optim.poly_power=0.9"]).optim
    ours, theirs = compact(), compact()
    optimizer, scheduler = build_optimizer(ours, cfg, iterations=total)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["betas"] for g in optimizer.param_groups] == [(0.9, 0.999)] * 2
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01] * 2
    train(ours, optimizer, scheduler)

    backbone = list(theirs.encoder.parameters())
    ids = {id(p) for p in backbone}
    reference = torch.optim.AdamW([{"params": backbone, "lr": lr},
                                   {"params": [p for p in theirs.parameters() if id(p) not in ids], "lr": lr * multi}],
                                  lr=lr, betas=(0.9, 0.999), weight_decay=0.01, foreach=True)

    class PolySetter:  # the lr set by hand as UniMatch does; LambdaLR gives (lr * multi) * factor
        iteration = 0

        def step(self) -> None:
            self.iteration += 1
            factor = (1 - self.iteration / total) ** 0.9
            reference.param_groups[0]["lr"] = lr * factor
            reference.param_groups[1]["lr"] = lr * multi * factor

    train(theirs, reference, PolySetter())
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(p, q), name
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in reference.param_groups]


def test_head_is_everything_outside_the_encoder_even_when_wrapped() -> None:
    model = compact()
    groups = parameter_groups(nn.DataParallel(model), 10.0, 0.1)
    assert [g["lr"] for g in groups] == [0.1, 0.1 * 10.0]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in model.encoder.parameters()]
    head = [id(p) for n, p in model.named_parameters() if not n.startswith("encoder.")]
    assert [id(p) for p in groups[1]["params"]] == head and head
    assert len(parameter_groups(model, 1.0, 0.1)) == 1


def test_optimizer_errors_name_the_key() -> None:
    model = compact()
    with pytest.raises(ConfigError, match="optim.head_lr_multiplier"):
        parameter_groups(model.parameters(), 2.0, 0.1)
    with pytest.raises(ConfigError, match="optim.head_lr_multiplier: expected > 0"):
        load_config(None, ["optim.head_lr_multiplier=0"])
    with pytest.raises(ConfigError, match="optim.head_lr_multiplier"):
        parameter_groups(nn.Linear(2, 2), 2.0, 0.1)
    with pytest.raises(ConfigError, match="optim.betas"):
        load_config(None, ["optim.name=adamw", "optim.betas=[0.9]"])
    with pytest.raises(ConfigError, match="optim.name"):
        load_config(None, ["optim.name=adam"])
