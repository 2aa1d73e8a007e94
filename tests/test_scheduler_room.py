"""The planner may lead the devices by ``max_queued`` items, not by the whole input: a
submission waits while the scheduler's intake and ready queue are full, goes on as devices take
batches, and gives up when the run halts (so a stopping run never hangs on its planner)."""

from __future__ import annotations

import threading
import time

from gpuengine.scheduler import Scheduler

from conftest import make_item


def _submitter(s: Scheduler, blocks: list[list]) -> tuple[threading.Thread, list[int]]:
    done: list[int] = []

    def run():
        for i, block in enumerate(blocks):
            s.submit(block)
            done.append(i)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, done


def _wait_until(condition, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_a_submission_waits_while_the_queue_is_full_and_goes_on_as_devices_take_work():
    s = Scheduler(window=10, max_queued=30)
    blocks = [[make_item(f"b{b}i{i}", 10) for i in range(10)] for b in range(6)]
    thread, done = _submitter(s, blocks)
    assert _wait_until(lambda: len(done) == 3)
    time.sleep(0.3)
    assert len(done) == 3 and s.pending() == 30  # the fourth block waits
    taken = []
    while len(taken) < 60:
        batch = s.next_batch(0, 100, timeout=2.0)  # ten items a batch
        assert batch is not None
        taken.extend(batch.block.digests)
        s.complete(batch.batch_id)
        assert s.pending() <= 30
    thread.join(5)
    assert not thread.is_alive() and len(done) == 6
    assert sorted(taken) == sorted(i.digest for b in blocks for i in b)  # each once


def test_a_halted_run_releases_a_waiting_submission():
    halt = threading.Event()
    s = Scheduler(window=10, max_queued=10, halt=halt)
    blocks = [[make_item(f"b{b}i{i}", 10) for i in range(10)] for b in range(3)]
    thread, done = _submitter(s, blocks)
    assert _wait_until(lambda: len(done) == 1)
    time.sleep(0.3)
    assert thread.is_alive() and len(done) == 1
    halt.set()
    thread.join(2)
    assert not thread.is_alive()
    assert s.pending() == 10  # what was not submitted was dropped: the run ends


def test_the_queue_bound_is_at_least_one_window():
    s = Scheduler(window=50, max_queued=5)
    s.submit([make_item(f"i{i}", 10) for i in range(49)])  # does not wait
    assert s.pending() == 49
