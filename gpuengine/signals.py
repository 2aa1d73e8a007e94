"""Stopping on a signal, for every front end (``embed``, ``predict``, ``serve``, the Python API).

The first SIGINT or SIGTERM sets a stop event: the run stops claiming input, finishes the
batches in flight, commits them and returns (``embed``/``predict`` then exit 130, ``serve``
exits 0). A second one exits at once with 130 (``os._exit``: nothing more is committed, and
nothing committed is harmed). What the front end says when it starts stopping is its own
business (``on_stop``). The Python API listens to SIGINT only and, on the second, raises
``KeyboardInterrupt`` rather than end the interpreter (a notebook's kernel lives on).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable

from gpuengine.errors import EXIT_INTERRUPTED

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_at_once() -> None:
    """The second signal of a command-line run: leave now, exit status 130."""
    os._exit(EXIT_INTERRUPTED)


class StopOnSignals:
    """``with StopOnSignals(on_stop=...) as stop:`` — SIGINT/SIGTERM set ``stop`` and call
    ``on_stop(signal name)``; a second one calls ``on_second`` (:func:`exit_at_once`).

    On leaving, the previous handlers come back; with ``keep_after_stop`` they stay replaced
    once a stop was requested (the process is ending: a second signal still exits at once).
    Outside the main thread (a test runner's worker, an embedded interpreter) nothing is
    installed and ``stop`` is only set by whoever holds it."""

    def __init__(self, stop: threading.Event | None = None,
                 on_stop: Callable[[str], Any] | None = None, *, keep_after_stop: bool = False,
                 signals: tuple[int, ...] = SIGNALS,
                 on_second: Callable[[], Any] = exit_at_once):
        self.stop = stop if stop is not None else threading.Event()
        self.on_stop = on_stop
        self.keep_after_stop = keep_after_stop
        self.signals = signals
        self.on_second = on_second
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> threading.Event:
        for sig in self.signals:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self.stop

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            self.on_second()
            return
        self.stop.set()
        if self.on_stop is not None:
            self.on_stop(signal.Signals(signum).name)

    def __exit__(self, *exc: object) -> None:
        if self.keep_after_stop and self.stop.is_set():
            return
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
