"""``gpuengine [COMMAND] --help`` as rendered (rich, as a user sees it): no ``<bool>`` type on
on/off flags, no stray space before a full stop, no reST ``double backticks``, and every
option's help text shown in full (rich markup swallows text in square brackets that it takes for
a style tag — which is how "per batch [default: from device memory]." became "per batch .")."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from gpuengine.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)


def rendered(args: list[str], width: int) -> str:
    result = CliRunner().invoke(app, args, env={"COLUMNS": str(width), "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return result.stdout


def flat(text: str) -> str:
    """The help without box drawing, whitespace collapsed: a wrapped help column reads as one
    line."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_every_command_is_checked():
    assert {"embed", "predict", "lookup", "info", "export", "devices", "serve",
            "status"} <= set(COMMANDS)


@pytest.mark.parametrize("width", [80, 200])
@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_clean(command, width):
    text = rendered([command, "--help"] if command else ["--help"], width)
    assert "<bool>" not in text
    assert "``" not in text
    assert not re.search(r"\s[.,;:](\s|$)", flat(text)), flat(text)
    if command:
        assert re.search(r"Examples?: gpuengine " + command, text)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_help_is_shown_in_full(command):
    text = flat(rendered([command, "--help"], 200))
    params = typer.main.get_command(app).commands[command].params
    for param in params:
        help_text = getattr(param, "help", None)
        if help_text:
            shown = " ".join(help_text.replace("\\[", "[").split())
            assert shown in text, f"--help of {command} lost part of: {shown!r}"


def test_flags_show_no_type_but_valued_options_do():
    text = rendered(["embed", "--help"], 200)
    skip = next(line for line in text.splitlines() if "--skip-invalid" in line)
    assert "<" not in skip
    table = next(line for line in text.splitlines() if "--table" in line)
    assert "<str>" in table
