"""A run stopped at a defined point, for tests that need an interrupted run with work left:
the stop comes from the committer right after the run's first commit, and no device takes a
batch beyond the first ``batches`` until the engine has halted on it. So the run is stopped
part way however busy the machine is (a stop from the progress display, which reports at most
every 0.1 s, can come after a small run is already complete)."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest

WAIT_SECONDS = 60.0
"""The longest a device waits for the first commit or for the engine's halt (a bound, not a
pace: either comes within about a second; after this the test fails instead of hanging)."""


@contextmanager
def stopped_after_first_commit(stop: threading.Event, batches: int = 2):
    """Inside the block, a run given ``stop`` is stopped once its first transaction is
    durable, having taken exactly ``batches`` batches before it (more in flight on other
    devices than the first ones cannot be committed: they are never taken)."""
    from gpuengine.committer import Committer
    from gpuengine.worker import DeviceWorker

    real_commit, real_next_batch = Committer._commit, DeviceWorker._next_batch
    lock, taken = threading.Lock(), [0]

    def commit_then_stop(self, *args, **kwargs):
        real_commit(self, *args, **kwargs)
        stop.set()

    def next_batch(self, wait):
        with lock:
            held = taken[0] >= batches
        if held:
            if not wait and not stop.is_set():
                return None  # finish the batches in flight first: their commit is the stop
            assert stop.wait(WAIT_SECONDS), "the run made no commit"
            self.halt.wait(WAIT_SECONDS)  # then None: the engine halted on the stop
        batch = real_next_batch(self, wait)
        if batch is not None:
            with lock:
                taken[0] += 1
        return batch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Committer, "_commit", commit_then_stop)
        patch.setattr(DeviceWorker, "_next_batch", next_batch)
        yield
