"""The central scheduler under simulated devices.

The tests drive :class:`gpuengine.scheduler.Scheduler` (torch-free) from simulated devices
(scheduler_sim.py): each device is a real thread, but the threads are stepped one at a time on
a *virtual* clock, so a run is deterministic for a seed and costs no real sleeping. Devices have
uneven speeds, a hidden real capacity (a batch above it runs out of memory and the device lowers
its :class:`~gpuengine.budget.TokenBudget` with ``after_oom``, as the worker does), scripted
telemetry (another process takes memory mid-run, the budget follows after a lag), prefetch
depth, items that fit nowhere, items whose batches fail, and devices that die mid-run (the
harness calls ``device_lost`` as the engine does on a worker's exit). A shadow model of the
documented policy checks every decision as it is made: retries first, windows length-sorted,
greedy fill within the budget, oversized items alone.

The engine around the scheduler, with fake runners, is tested in test_engine_faults.py; the
token budget in test_budget.py and the device worker in test_worker.py.

Known bugs are marked ``xfail(strict=True)`` with the reason.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

from conftest import digests, make_item
from gpuengine.budget import TokenBudget
from gpuengine.scheduler import ScheduledBatch, Scheduler
from scheduler_sim import Harness, Scenario

SCENARIOS = [
    Scenario("uneven-speeds"),
    Scenario("oom-learning", capacities=(700, 500, 600)),
    Scenario("memory-taken-midrun", telemetry=((2.0, 0, 350, 300, 0.5), (6.0, 0, 4096, 1024, 0.5),
                                               (3.0, 1, 400, 380, 0.2))),
    Scenario("never-fits", capacities=(2000, 2000, 2000), huge=3),
    Scenario("never-fits-3-solo", capacities=(2000, 2000, 2000), huge=2, max_solo=3),
    Scenario("device-lost", deaths={1: 2.0}, depth=2),
    Scenario("failing-batches", poison=2),
    Scenario("chaos", speeds=(1000.0, 800.0, 600.0, 200.0), capacities=(900, 700, 800, 1500),
             depth=2, huge=2, poison=1, deaths={1: 1.5, 2: 4.0},
             telemetry=((1.0, 0, 400, 350, 0.4), (5.0, 0, 900, 1024, 0.3)), n_items=300),
]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_simulated_devices(scenario: Scenario, seed: int):
    harness = Harness(scenario, seed)
    harness.run()
    harness.check()
    if scenario.capacities[0] < scenario.maximum or scenario.telemetry:
        assert sum(d.ooms for d in harness.devices) > 0  # the scenario did exercise OOMs
    if scenario.deaths:
        assert harness.sched.stats.requeued_after_loss > 0  # died holding batches: requeued
    if scenario.huge:
        assert harness.sched.stats.failed >= scenario.huge


def test_simulation_is_deterministic():
    """Same seed, same scenario: the same decisions (the harness steps threads in a fixed order)."""
    runs = []
    for _ in range(2):
        h = Harness(SCENARIOS[-1], 7)
        h.run()
        runs.append((h.sim.now, [d.batches for d in h.devices], dict(h.sched.stats.per_device_batches)))
    assert runs[0] == runs[1]


# -- deterministic unit tests of the policy --------------------------------------------------


def test_window_is_sorted_and_sliding():
    s = Scheduler(window=4)
    items = {n: make_item(f"w{n}", n) for n in (50, 10, 30, 20, 5, 7)}
    for n in (50, 10, 30, 20):  # one at a time: the 4th fills the window
        s.submit([items[n]])
    s.submit([items[5]])  # the next window: must not jump ahead of the first one
    first = s.next_batch(0, 35)
    assert [it.n_tokens for it in first.items] == [10, 20]  # greedy, sorted; 30 would overflow
    assert [it.n_tokens for it in s.next_batch(0, 35).items] == [30]
    big = s.next_batch(0, 35)
    assert [it.n_tokens for it in big.items] == [50]  # larger than the budget: alone
    s.submit([items[7]])
    # nothing ready: the partial window is flushed, sorted
    assert [it.n_tokens for it in s.next_batch(0, 100).items] == [5, 7]
    s.close()
    assert s.next_batch(0, 100) is None and not s.finished  # four batches still in flight
    for bid in s.in_flight():
        s.complete(bid)
    assert s.finished and s.stats.completed == 6


def test_padded_budget_counts_n_times_longest():
    s = Scheduler()
    s.submit([make_item(f"p{i}", n) for i, n in enumerate((10, 10, 10, 40))])
    s.close()
    padded = s.next_batch(0, 100, padded=True)
    assert [it.n_tokens for it in padded.items] == [10, 10, 10]  # 4 x 40 = 160 > 100
    s2 = Scheduler()
    s2.submit([make_item(f"p{i}", n) for i, n in enumerate((10, 10, 10, 40))])
    assert len(s2.next_batch(0, 100, padded=False).items) == 4  # 70 real tokens


def test_oom_splits_retries_first_and_gives_up_once():
    s = Scheduler(max_solo_attempts=2)
    a = [make_item(f"a{i}", 10) for i in range(4)]
    s.submit(a)
    s.close()
    batch = s.next_batch(0, 1000)
    assert digests(batch.items) == digests(a)
    s.submit([make_item("late", 10)])  # ready work exists, but retries go first
    assert s.out_of_memory(batch.batch_id) == ()
    h1 = s.next_batch(1, 1000)
    h2 = s.next_batch(0, 1000)
    assert (digests(h1.items), digests(h2.items)) == (digests(a[:2]), digests(a[2:]))
    assert h1.attempt == h2.attempt == 1
    s.complete(h2.batch_id)
    assert s.out_of_memory(h1.batch_id) == ()
    q1 = s.next_batch(0, 1000)
    assert digests(q1.items) == digests(a[:1]) and q1.attempt == 2
    s.complete(q1.batch_id)
    solo = s.next_batch(1, 1000)
    assert digests(solo.items) == digests(a[1:2])
    assert s.out_of_memory(solo.batch_id) == ()  # first solo failure: one more try
    again = s.next_batch(0, 1000)
    assert digests(again.items) == digests(a[1:2])
    assert s.out_of_memory(again.batch_id) == (a[1],)  # second: given up, reported once
    late = s.next_batch(0, 1000)
    assert digests(late.items) == (make_item("late", 10).digest,)
    s.complete(late.batch_id)
    assert s.next_batch(0, 1000) is None and s.finished
    assert (s.stats.completed, s.stats.failed, s.stats.oom_splits) == (4, 1, 2)


def test_device_lost_requeues_in_flight_and_rejects_stale_reports():
    s = Scheduler()
    items = [make_item(f"l{i}", 10) for i in range(6)]
    s.submit(items)
    s.close()
    b1 = s.next_batch(0, 20)
    b2 = s.next_batch(0, 20)  # prefetched: two batches in flight on device 0
    s.next_batch(1, 20)
    assert s.device_lost(0) == 4 and s.stats.requeued_after_loss == 4
    assert s.next_batch(0, 1000) is None  # the lost device gets nothing more
    got = {digests(s.next_batch(1, 20).items) for _ in range(2)}
    assert got == {digests(b1.items), digests(b2.items)}
    for bid in s.in_flight():
        s.complete(bid)
    with pytest.raises(KeyError):  # the lost device's late report cannot complete it twice
        s.complete(b1.batch_id)
    assert s.finished and s.stats.completed == 6


def test_concurrent_free_threads_exactly_once():
    """No virtual clock: four device threads, a producer and a dying device race freely."""
    rng = random.Random(5)
    items = [make_item(f"c{i}", rng.randint(3, 120)) for i in range(1500)]
    s = Scheduler(window=64, max_solo_attempts=2)
    completed: Counter[bytes] = Counter()
    given_up: Counter[bytes] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def producer() -> None:
        for start in range(0, len(items), 50):
            s.submit(items[start:start + 50])
            time.sleep(0)
        s.close()

    def device(index: int, capacity: int, die_after: int | None) -> None:
        try:
            local_rng = random.Random(index)
            budget = TokenBudget(600, 600)
            held = []
            done = 0
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                batch = s.next_batch(index, budget.tokens(), timeout=0.01)
                if batch is None:
                    if s.finished:
                        return
                    continue
                if die_after is not None and done >= die_after:
                    held.append(batch)  # dies holding it: never reported
                    with lock:
                        s.device_lost(index)
                    return
                if batch.n_tokens > capacity or local_rng.random() < 0.05:
                    budget.after_oom(batch.n_tokens)
                    gone = s.out_of_memory(batch.batch_id)
                    with lock:
                        given_up.update(digests(gone))
                else:
                    done_batch = s.complete(batch.batch_id)
                    with lock:
                        completed.update(digests(done_batch.items))
                    done += 1
            raise AssertionError(f"device {index} did not finish")
        except Exception as exc:  # noqa: BLE001 - asserted empty in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=producer)]
    threads += [threading.Thread(target=device, args=(i, cap, die))
                for i, (cap, die) in enumerate([(400, None), (300, 5), (500, None), (200, None)])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert not errors, errors
    assert s.finished and s.pending() == 0
    assert all(c == 1 for c in (completed + given_up).values())
    assert set(completed) | set(given_up) == set(digests(items))
    assert not set(completed) & set(given_up)
    assert s.stats.completed + s.stats.failed == s.stats.submitted == len(items)
    assert s.stats.requeued_after_loss > 0  # device 1 died holding a batch


# -- known bugs --------------------------------------------------------------------------------


def test_next_batch_waits_while_batches_are_in_flight():
    s = Scheduler()
    s.submit([make_item(f"t{i}", 10) for i in range(4)])
    s.close()
    flying = s.next_batch(0, 1000)

    def oom_later() -> None:
        time.sleep(0.15)
        s.out_of_memory(flying.batch_id)  # its halves come back for the idle device

    thread = threading.Thread(target=oom_later)
    thread.start()
    try:
        started = time.monotonic()
        batch = s.next_batch(1, 1000, timeout=2.0)
        waited = time.monotonic() - started
    finally:
        thread.join()
    assert batch is not None, f"next_batch returned None after {waited * 1000:.2f} ms " \
                              "instead of waiting for the requeued work"


def test_next_batch_wakes_up_when_items_are_submitted():
    s = Scheduler()  # window 50 000: a small submission stays in the intake
    timer = threading.Timer(0.02, lambda: s.submit([make_item("arrives", 10)]))
    timer.start()
    try:
        started = time.monotonic()
        batch = s.next_batch(0, 100, timeout=0.4)
        waited = time.monotonic() - started
    finally:
        timer.join()
    assert batch is not None
    assert waited < 0.3, f"work arrived after 0.02 s but the device waited {waited:.2f} s"


@pytest.mark.parametrize("how", ["after-device-loss", "after-oom-on-a-bigger-device"])
def test_retries_respect_the_asking_devices_budget(how: str):
    s = Scheduler()
    s.submit([make_item(f"r{i}", 100) for i in range(20)])
    s.close()
    big = s.next_batch(0, 2000)  # all 20 items, 2000 tokens, on the big device
    assert len(big.items) == 20
    if how == "after-device-loss":
        s.device_lost(0)
    else:
        s.out_of_memory(big.batch_id)  # halves of 1000 tokens
    small = s.next_batch(1, 300)  # the small device (or one whose memory was just taken)
    n, tokens = len(small.items), small.n_tokens
    assert n == 1 or tokens <= 300, f"{n} items, {tokens} tokens handed to a 300-token budget"


def test_solo_retry_is_not_given_up_before_a_bigger_device_tries_it():
    s = Scheduler(max_solo_attempts=2)
    item = make_item("fits-only-on-the-big-one", 300)
    filler = make_item("filler", 100)
    s.submit([item, filler])
    s.close()
    small, big = (0, 200), (1, 1000)  # (device, capacity == budget)
    given_up, done = [], []

    def step(device: int, capacity: int) -> ScheduledBatch | None:
        batch = s.next_batch(device, capacity)
        if batch is not None and batch.n_tokens > capacity:
            given_up.extend(s.out_of_memory(batch.batch_id))
            return None
        return batch

    busy = s.next_batch(big[0], 100)  # the big device is busy with the filler ...
    assert digests(busy.items) == (filler.digest,)
    for _ in range(3):  # ... while the small one fails the item and, idle, asks again at once
        step(*small)
    done.extend(s.complete(busy.batch_id).items)
    for _ in range(5):  # then both ask in turn
        for device in (small, big):
            batch = step(*device)
            if batch is not None:
                done.extend(s.complete(batch.batch_id).items)
    assert s.finished
    assert len(given_up) == 0, "given up after failing twice on the small device only"
    assert set(digests(done)) == {item.digest, filler.digest}
