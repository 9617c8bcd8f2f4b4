"""A command line that explains itself: --version, overrides in every --help, ``sclseg config show``."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from importlib.metadata import version
from pathlib import Path

import pytest

from sclseg.cli import build_parser, main
from sclseg.config import Config, config_help
from sclseg.config_reference import markdown

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"
_MARKUP = re.compile(r"``|:(class|func|mod|meth|data):`")


def _keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config, walked from the dataclasses themselves."""
    hints, keys = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_version_prints_the_installed_version(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"sclseg {version('sclseg')}"


@pytest.mark.parametrize("command", ["train", "evaluate", "check", "demo", "compare", "config"])
def test_every_command_with_overrides_explains_them_in_its_help(command, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "section.key=value" in text and "sclseg config show CONFIG" in text and "docs/config.md" in text
    assert "train.iterations=200 method.name=cl" in text and "optim.lr=0.0001" in text  # two examples
    assert not _MARKUP.search(text)


def test_no_help_text_holds_markup(capsys) -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subparsers.choices.items():
        assert not _MARKUP.search(sub.format_help()), name
    assert not _MARKUP.search(parser.format_help())


def test_every_key_has_a_one_line_meaning() -> None:
    meanings = config_help()
    assert list(meanings) == _keys()
    for key, text in meanings.items():
        assert text and "\n" not in text and len(text) < 120, key


def test_config_show_prints_every_key_with_its_value_default_and_meaning(capsys) -> None:
    assert main(["config", "show", "digits/default", "train.iterations=7", "optim.lr=0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(_keys())
    by_key = {line[2:].split(" = ")[0]: line for line in lines}
    assert set(by_key) == set(_keys())
    assert by_key["train.iterations"].startswith("* train.iterations = 7 ")
    assert "(default: 1000)  optimizer steps of the run" in by_key["train.iterations"]
    assert by_key["optim.lr"].startswith("* optim.lr = 0.5 ") and "(default: 0.002)" in by_key["optim.lr"]
    assert by_key["eval.flip"].startswith("  eval.flip = false ")  # unchanged: no mark


def test_config_show_of_a_bad_override_is_a_one_line_error(capsys) -> None:
    assert main(["config", "show", "digits/default", "train.iterationz=7"]) == 2
    assert "did you mean 'train.iterations'" in capsys.readouterr().err


def test_docs_config_md_is_the_generated_reference() -> None:
    assert DOCS.read_text() == markdown(), "regenerate: python -m sclseg.config_reference > docs/config.md"
    for key in _keys():
        assert f"| `{key}` |" in DOCS.read_text()
