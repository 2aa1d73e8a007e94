"""``gpuengine.signals.StopOnSignals``: real signals sent to this process (pytest runs tests in
the main thread, where Python delivers them). The whole-process behaviour (a second Ctrl-C
exits 130) is tested on real ``gpuengine embed`` processes in test_resume.py, the daemon's
drain in test_daemon.py, the API's in test_api.py."""

from __future__ import annotations

import os
import signal
import threading
import time

from gpuengine.signals import StopOnSignals


def send(sig: int, event: threading.Event) -> None:
    """Signal this process and wait until the handler has run."""
    os.kill(os.getpid(), sig)
    deadline = time.monotonic() + 5
    while not event.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert event.is_set(), f"{signal.Signals(sig).name} was not handled"


def test_first_signal_stops_second_calls_on_second_then_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    said, second = [], threading.Event()
    with StopOnSignals(on_stop=said.append, on_second=second.set) as stop:
        assert not stop.is_set()
        send(signal.SIGTERM, stop)
        assert said == ["SIGTERM"]
        send(signal.SIGINT, second)
        assert said == ["SIGTERM"]  # the second signal does not announce a stop again
    assert {s: signal.getsignal(s) for s in before} == before


def test_keep_after_stop_leaves_the_handlers_once_stopping():
    previous = signal.getsignal(signal.SIGTERM)
    guard = StopOnSignals(keep_after_stop=True, on_second=lambda: None)
    try:
        with guard as stop:
            send(signal.SIGTERM, stop)
        assert signal.getsignal(signal.SIGTERM) == guard._handle  # still exits at once
    finally:
        signal.signal(signal.SIGTERM, previous)
    with StopOnSignals(keep_after_stop=True) as stop:  # no stop requested: restored
        pass
    assert signal.getsignal(signal.SIGTERM) == previous and not stop.is_set()


def test_only_the_signals_asked_for_and_a_given_event():
    stop = threading.Event()
    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignals(stop, signals=(signal.SIGINT,)) as returned:
        assert returned is stop
        assert signal.getsignal(signal.SIGTERM) == before
        send(signal.SIGINT, stop)


def test_outside_the_main_thread_nothing_is_installed():
    before = signal.getsignal(signal.SIGINT)
    seen = {}

    def worker():
        with StopOnSignals() as stop:
            seen["stop"] = stop
            seen["handler"] = signal.getsignal(signal.SIGINT)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen["handler"] == before and not seen["stop"].is_set()
