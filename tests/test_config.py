"""Loading a config: the schema's types and ranges, overrides, and the errors that name the key,
the override or the line (one line, exit 2 from the command line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sclseg.cli import EXIT_USAGE, main
from sclseg.config import ConfigError, load_config, resolve_config_path

from tiny_config import TINY


def test_unknown_config_key_names_the_nearest_valid_key(tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match=r"method\.lambda_sc"):
        load_config(resolve_config_path("digits/default"), ["method.lambda_sx=2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  iteratons: 3\n")
    assert main(["train", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "train.iteratons" in err and "train.iterations" in err


def test_wrong_value_type_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.iterations: expected an integer"):
        load_config(None, ["train.iterations=ten"])
    with pytest.raises(ConfigError, match=r"method\.name: expected one of"):
        load_config(None, ["method.name=mixmatch"])


def test_exponent_floats_without_a_dot_are_numbers() -> None:
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == pytest.approx(1e-3)


def test_unknown_or_mistyped_training_keys_name_the_key(tmp_path, capsys) -> None:
    cfg = resolve_config_path("digits/default")
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.grad_acum'; did you mean 'train\.grad_accum'"):
        load_config(cfg, ["train.grad_acum=2"])
    with pytest.raises(ConfigError, match=r"train\.amp: expected one of 'off', 'bf16', 'fp16', got 'fp32'"):
        load_config(cfg, ["train.amp=fp32"])
    # YAML reads a bare `off` as false: the choice named off is meant
    bare_off = load_config(cfg, ["train.amp=off", "train.activation_checkpointing=off"]).train
    assert (bare_off.amp, bare_off.activation_checkpointing) == ("off", "off")
    with pytest.raises(ConfigError, match=r"method\.name: expected a string, got False"):
        load_config(cfg, ["method.name=off"])
    with pytest.raises(ConfigError, match=r"train\.channels_last: expected true or false"):
        load_config(cfg, ["train.channels_last=3"])
    assert main(["train", "digits/default", "--out", str(tmp_path / "r"), *TINY, "train.grad_accum=0"]) == 2
    assert "train.grad_accum: expected >= 1, got 0" in capsys.readouterr().err


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
