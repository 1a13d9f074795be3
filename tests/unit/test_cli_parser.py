"""The ``guard`` parser: version, help on every flag, examples, plain text, global flags."""

from __future__ import annotations

import argparse
import re

import pytest

import guard
from guard.cli import _parser
from guard.clidoc import EXAMPLES, _subcommands, plain

RST = re.compile(r"``|:(func|mod|class|meth|data|attr):`")


def commands() -> dict[str, argparse.ArgumentParser]:
    return {name: sub for name, (sub, _) in _subcommands(_parser()).items()}


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"guard {guard.__version__}"


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_flag_has_help_and_the_command_has_examples(name: str) -> None:
    sub = commands()[name]
    missing = [a.option_strings or a.dest for a in sub._actions if not (a.help or "").strip()]
    assert missing == []
    assert sub.description
    assert name in EXAMPLES and all(line.startswith(f"guard {name}") for line in EXAMPLES[name])
    text = sub.format_help()
    assert "examples:" in text and EXAMPLES[name][0] in text


@pytest.mark.parametrize("name", sorted(commands()))
def test_no_rst_markup_reaches_users(name: str) -> None:
    assert not RST.search(commands()[name].format_help())
    assert not RST.search(_parser().format_help())


def test_plain_strips_literals_and_roles() -> None:
    text = "``guard certify``: see :func:`guard.x.y` and :mod:`~guard.z`"
    assert plain(text) == "guard certify: see guard.x.y and guard.z"


@pytest.mark.parametrize(
    "argv",
    [
        ["--log-level", "debug", "--log-format", "json", "check", "p.yaml"],
        ["check", "p.yaml", "--log-level", "debug", "--log-format", "json"],
        ["--log-level", "debug", "check", "--log-format", "json", "p.yaml"],
    ],
)
def test_global_flags_before_or_after_the_command(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    assert (args.log_level, args.log_format, args.command) == ("debug", "json", "check")


def test_global_flag_before_the_command_is_not_reset_by_the_subcommand() -> None:
    args = _parser().parse_args(["--log-level", "error", "serve"])
    assert args.log_level == "error" and args.log_format == "text"
    args = _parser().parse_args(["serve", "--port", "1"])
    assert args.log_level == "info"
