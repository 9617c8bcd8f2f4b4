"""Config text and command mistakes: one line naming the file, key or override, exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from sclseg.cli import EXIT_USAGE, main
from sclseg.engine.checkpoint import load_checkpoint, save_atomic

from tiny_config import TINY


# ------------------------------------------------------------------ evaluate scores the model it says
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "digits/default", "--out", str(out), *TINY, "train.iterations=1",
                 "train.eval_interval=1"]) == 0
    return out


@pytest.mark.parametrize("override, named", [
    ("model.width=16", "the checkpoint holds model width=8, the config asks for width=16"),
    ("model.name=deeplabv3plus_resnet50", "name='compact', the config asks for name='deeplabv3plus_resnet50'"),
])
def test_evaluate_refuses_a_config_of_another_model_naming_both(trained, tmp_path, capsys, override, named) -> None:
    code = main(["evaluate", str(trained / "config.yaml"), "--checkpoint", str(trained / "step_1.pt"), override,
                 "--out", str(tmp_path / "e.json")])
    assert code == EXIT_USAGE
    assert named in capsys.readouterr().err and not (tmp_path / "e.json").exists()


def test_evaluate_refuses_other_class_names(trained, tmp_path, capsys) -> None:
    code = main(["evaluate", str(trained / "config.yaml"), "--checkpoint", str(trained / "step_1.pt"),
                 "--out", str(tmp_path / "e.json")])
    assert code == 0  # its own config scores it
    ckpt = load_checkpoint(trained / "step_1.pt")
    ckpt["class_names"] = list(reversed(ckpt["class_names"]))
    save_atomic(ckpt, tmp_path / "renamed.pt")
    assert main(["evaluate", str(trained / "config.yaml"), "--checkpoint", str(tmp_path / "renamed.pt"),
                 "--out", str(tmp_path / "e2.json")]) == EXIT_USAGE
    assert "expected the same classes in the same order" in capsys.readouterr().err
