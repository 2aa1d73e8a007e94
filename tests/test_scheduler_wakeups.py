"""Devices waiting for work are woken one at a time (a submit wakes one; a device that takes a
batch and leaves work behind wakes the next), not all of them per submit and per completed
batch: eight idle no-op devices woken together cost the engine's one interpreter lock about
12 % of the DNABERT-S host pipeline's rate (results.jsonl rows with ``variant`` herd/base).
These tests pin that no wake-up is lost on the way: work for several devices reaches them
all at once, long before their wait would time out, and the end of the run wakes everyone."""

from __future__ import annotations

import threading
import time

from conftest import make_item
from gpuengine.scheduler import Scheduler

WAIT = 5.0
"""Each device's wait for work: a lost wake-up would show as a delay of this length."""


class _Counting(threading.Condition):
    def __init__(self, lock) -> None:
        super().__init__(lock)  # the scheduler's: its other condition shares it
        self.calls = {"notify": 0, "notify_all": 0}

    def notify(self, n: int = 1) -> None:
        self.calls["notify"] += 1
        super().notify(n)

    def notify_all(self) -> None:
        self.calls["notify_all"] += 1
        super().notify_all()


def _devices_waiting(scheduler: Scheduler, n: int, budget: int):
    got: dict[int, tuple[float, object]] = {}
    ready = threading.Barrier(n + 1)

    def device(index: int) -> None:
        ready.wait()
        batch = scheduler.next_batch(index, budget, timeout=WAIT)
        got[index] = (time.monotonic(), batch)

    threads = [threading.Thread(target=device, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    ready.wait()
    time.sleep(0.2)  # every device is inside its wait now
    return got, threads


def test_work_for_four_devices_reaches_four_waiting_devices_at_once():
    scheduler = Scheduler(window=10)
    scheduler._cv = _Counting(scheduler._lock)
    got, threads = _devices_waiting(scheduler, 4, budget=100)
    start = time.monotonic()
    scheduler.submit([make_item(f"s{i}", 100) for i in range(4)])  # one batch per device
    for t in threads:
        t.join()
    batches = [b for _, b in got.values()]
    assert all(b is not None for b in batches)
    assert sorted(len(b.items) for b in batches) == [1, 1, 1, 1]
    assert max(at for at, _ in got.values()) - start < WAIT / 2  # no device waited it out
    assert scheduler._cv.calls["notify_all"] == 0  # woken one by one, not all per submit


def test_closing_wakes_every_waiting_device():
    scheduler = Scheduler()
    got, threads = _devices_waiting(scheduler, 3, budget=100)
    start = time.monotonic()
    scheduler.close()
    for t in threads:
        t.join()
    assert [b for _, b in got.values()] == [None, None, None]
    assert max(at for at, _ in got.values()) - start < WAIT / 2


def test_the_last_completion_wakes_every_waiting_device():
    scheduler = Scheduler()
    scheduler.submit([make_item("only", 10)])
    scheduler.close()
    batch = scheduler.next_batch(0, 100)
    got, threads = _devices_waiting(scheduler, 3, budget=100)  # nothing left for them
    start = time.monotonic()
    scheduler.complete(batch.batch_id)
    for t in threads:
        t.join()
    assert [b for _, b in got.values()] == [None, None, None]
    assert max(at for at, _ in got.values()) - start < WAIT / 2
    assert scheduler.finished
