"""Config text and command mistakes: one line naming the file, key or override, exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from sclseg.cli import EXIT_USAGE, main
from sclseg.config import ConfigError, load_config
from sclseg.engine.checkpoint import load_checkpoint, save_atomic
from tiny_config import TINY


@pytest.mark.parametrize("override", ["data.crop_size=[64,64", "train.seed=!!python/object/apply:os.system [ls]",
                                      "model.name={a: 1"])
def test_an_override_that_is_not_yaml_is_one_line_naming_it(tmp_path, capsys, override) -> None:
    code = main(["check", "digits/default", override, "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE
    assert len(err.splitlines()) == 1 and f"override '{override}'" in err and "not valid YAML" in err


def test_an_empty_config_file_is_an_error_not_the_digits_default(tmp_path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml: the file is empty"):
        load_config(empty)


@pytest.mark.parametrize("text, named", [
    ("train:\n  iterations: 10\nmodel:\n  width: 8\ntrain:\n  seed: 1\n", "'train' is written twice (lines 1 and 5)"),
    ("train:\n  iterations: 10\n  iterations: 20\n", "'iterations' is written twice (lines 2 and 3)"),
])
def test_a_section_or_key_written_twice_is_named(tmp_path, capsys, text, named) -> None:
    config = tmp_path / "twice.yaml"
    config.write_text(text)
    assert main(["check", str(config), "--report", str(tmp_path / "r.json")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert named in err and str(config) in err and len(err.strip().splitlines()) == 1


def test_a_yaml_syntax_error_in_the_file_is_one_line_with_its_position(tmp_path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("train:\n  iterations: [10\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML: .*\(line \d+, column \d+\)$"):
        load_config(config)


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
