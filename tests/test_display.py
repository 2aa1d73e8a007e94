"""``gpuengine.display``: logging set-up for the CLI and the daemon (the progress bar and the
summary are tested on real runs in test_progress.py)."""

from __future__ import annotations

import logging

import pytest

from gpuengine.display import setup_logging


@pytest.fixture
def root_logging():
    """Put the root logger back as it was (setup_logging replaces its handlers)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("quiet, verbose, shown", [(False, 0, ["info", "warning"]),
                                                    (True, 0, ["warning"]),
                                                    (False, 2, ["debug", "info", "warning"])])
def test_plain_logging_is_time_level_message_on_stderr(capsys, root_logging, quiet, verbose,
                                                       shown):
    """The daemon's format (journald adds its own metadata): one plain line per record."""
    setup_logging(verbose, quiet, plain=True)
    log = logging.getLogger("gpuengine.test")
    log.debug("debug")
    log.info("info")
    log.warning("warning")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert [line.split(" ", 3)[3] for line in lines] == shown
    assert [line.split(" ", 3)[2] for line in lines] == [m.upper() for m in shown]


def test_rich_logging_goes_to_stderr_with_the_same_levels(capsys, root_logging):
    """The CLI's handler (rich, on the stderr console): -q keeps warnings only."""
    setup_logging(0, True)
    log = logging.getLogger("gpuengine.test")
    log.info("not shown")
    log.warning("shown")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "shown" in captured.err and "not shown" not in captured.err


def test_merge_bar_on_a_terminal_draws_its_bar(monkeypatch):
    """``gpuengine merge``'s bar where stderr is a terminal: it starts, advances and stops
    (its time-remaining column was used without being imported: a NameError mid-merge)."""
    import io

    from rich.console import Console

    from gpuengine import display

    out = io.StringIO()
    monkeypatch.setattr(display, "stderr", Console(file=out, force_terminal=True, width=100))
    bar = display.MergeBar()
    assert bar.live
    bar.start("merging", 10)
    bar.advance(4, nbytes=4096)
    bar.close()
    assert "merging" in out.getvalue()
