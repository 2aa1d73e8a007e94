"""SIGINT and SIGTERM for every front end (``embed``, ``predict``, ``serve``).

The first signal sets a stop event: the run stops claiming input, finishes the batches in
flight, commits them and returns (``embed``/``predict`` then exit 130, ``serve`` exits 0). A
second signal exits at once with 130 (``os._exit``: nothing more is committed, and nothing
committed is harmed). What the front end says when it starts stopping is its own business
(``on_stop``).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable

from gpuengine.errors import EXIT_INTERRUPTED

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignals:
    """``with StopOnSignals(on_stop=...) as stop:`` — SIGINT/SIGTERM set ``stop`` and call
    ``on_stop(signal name)``; a second one calls ``os._exit(130)``.

    On leaving, the previous handlers come back; with ``keep_after_stop`` they stay replaced
    once a stop was requested (the process is ending: a second signal still exits at once).
    Outside the main thread (a test runner's worker) nothing is installed and ``stop`` is only
    set by whoever holds it."""

    def __init__(self, stop: threading.Event | None = None,
                 on_stop: Callable[[str], Any] | None = None, *, keep_after_stop: bool = False):
        self.stop = stop if stop is not None else threading.Event()
        self.on_stop = on_stop
        self.keep_after_stop = keep_after_stop
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> threading.Event:
        for sig in SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self.stop

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop.is_set():
            os._exit(EXIT_INTERRUPTED)
        self.stop.set()
        if self.on_stop is not None:
            self.on_stop(signal.Signals(signum).name)

    def __exit__(self, *exc: object) -> None:
        if self.keep_after_stop and self.stop.is_set():
            return
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()
