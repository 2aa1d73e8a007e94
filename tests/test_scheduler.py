"""The central scheduler under simulated devices.

The tests drive :class:`gpuengine.scheduler.Scheduler` (torch-free) from simulated devices: each
device is a real thread, but the threads are stepped one at a time on a *virtual* clock (see
:class:`Sim`), so a run is deterministic for a seed and costs no real sleeping. Devices have
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

import heapq
import itertools
import random
import threading
import time
from collections import defaultdict, Counter, deque
from dataclasses import dataclass, field

import pytest

from conftest import cost_of, digests, make_item
from gpuengine.budget import MIN_TOKENS, TokenBudget
from gpuengine.packing import WorkItem
from gpuengine.scheduler import ScheduledBatch, Scheduler


class Sim:
    """Deterministic stepping of real threads on a virtual clock.

    Exactly one simulated process runs at a time; the others wait inside :meth:`sleep`. When
    the running one sleeps (or returns), the clock jumps to the earliest wake-up (ties: first
    come, first served) and that process runs. Real threads, so the scheduler is called from
    many threads, but in an order fixed by the seed."""

    def __init__(self, *, max_steps: int = 200_000, real_timeout: float = 10.0):
        self.now = 0.0
        self.steps = 0
        self.max_steps = max_steps
        self.real_timeout = real_timeout
        self._heap: list = []
        self._seq = itertools.count()
        self._yielded = threading.Event()
        self._current: _Proc | None = None
        self.errors: list[tuple[str, BaseException]] = []

    def spawn(self, name: str, fn, at: float = 0.0) -> None:
        proc = _Proc(name, threading.Event())

        def body() -> None:
            proc.go.wait()
            try:
                fn(self)
            except Exception as exc:  # noqa: BLE001 - re-raised by run() in the test thread
                self.errors.append((name, exc))
            finally:
                proc.done = True
                self._yielded.set()

        proc.thread = threading.Thread(target=body, daemon=True, name=f"sim-{name}")
        heapq.heappush(self._heap, (at, next(self._seq), proc))
        proc.thread.start()

    def sleep(self, dt: float) -> None:
        """Called by the running process: give the clock away for ``dt`` virtual seconds."""
        proc = self._current
        assert proc is not None and threading.current_thread() is proc.thread
        proc.go.clear()
        heapq.heappush(self._heap, (self.now + max(0.0, dt), next(self._seq), proc))
        self._yielded.set()
        proc.go.wait()

    def run(self) -> None:
        while self._heap and not self.errors:
            at, _, proc = heapq.heappop(self._heap)
            self.now = at
            self._current = proc
            self.steps += 1
            assert self.steps <= self.max_steps, f"no termination after {self.max_steps} steps " \
                                                 f"(virtual time {self.now:.1f})"
            self._yielded.clear()
            proc.go.set()
            assert self._yielded.wait(self.real_timeout), \
                f"process {proc.name} neither slept nor returned within {self.real_timeout}s " \
                "(blocked inside the scheduler?)"
        if self.errors:
            name, exc = self.errors[0]
            raise AssertionError(f"simulated process {name} failed: {exc!r}") from exc


@dataclass
class _Proc:
    name: str
    go: threading.Event
    thread: threading.Thread | None = None
    done: bool = False


class Shadow:
    """The documented policy, replayed next to the real scheduler; checks each decision.

    Retry order is not modelled (only that a retry the asking device may take goes before any
    ready item, cut to the prefix that fits its budget); the ready queue is: each window
    stably sorted by length, windows in arrival order."""

    def __init__(self, window: int):
        self.window = window
        self.intake: list[WorkItem] = []
        self.ready: deque[WorkItem] = deque()
        self.retry: list[tuple[tuple[WorkItem, ...], int, frozenset]] = []  # (items, attempt, failed_on)
        self.devices: set[int] = set()
        self.lost_devices: set[int] = set()
        self.in_flight: dict[int, tuple[int, tuple[WorkItem, ...], int]] = {}
        self.fresh_budget_checked = 0

    def submit(self, items) -> None:
        self.intake.extend(items)
        if len(self.intake) >= self.window:
            self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        self.ready.extend(sorted(self.intake, key=lambda it: it.n_tokens))
        self.intake = []

    def next_batch(self, device: int, budget: int, padded: bool, batch: ScheduledBatch | None):
        live = (self.devices - self.lost_devices) | {device}
        eligible = [i for i, (_, _, failed) in enumerate(self.retry)
                    if device not in failed or live <= failed]
        if not (eligible or self.ready):
            self._flush()
        if batch is None:
            assert not eligible and not self.ready, \
                f"device {device} got nothing while {len(eligible)} retries and " \
                f"{len(self.ready)} ready items wait"
            return
        self.devices.add(device)
        key = digests(batch.items)
        if eligible:
            # retries go first, as split (or requeued after a loss), cut to the budget
            matches = [i for i in eligible if digests(self.retry[i][0])[:len(key)] == key]
            assert matches, "a retry was waiting but the batch is not a prefix of one"
            index = matches[0]
            items, attempt, failed = self.retry[index]
            assert batch.attempt == attempt
            n = len(key)
            assert n == 1 or cost_of(batch.items, padded) <= budget, \
                f"retried batch of {n} items costs {cost_of(batch.items, padded)} > budget {budget}"
            if n < len(items):
                assert cost_of(items[:n + 1], padded) > budget, "retry cut before the budget was full"
                self.retry[index] = (items[n:], attempt, frozenset())
                failed = frozenset()
            else:
                del self.retry[index]
            self.in_flight[batch.batch_id] = (device, batch.items, batch.attempt, failed)
            return
        else:
            n = len(batch.items)
            assert batch.attempt == 0
            expected = digests(list(itertools.islice(self.ready, n)))
            assert key == expected, "a first-try batch is not the next run of the length-sorted window"
            assert n == 1 or cost_of(batch.items, padded) <= budget, \
                f"batch of {n} items costs {cost_of(batch.items, padded)} > budget {budget}"
            if n < len(self.ready):  # greedy: the next item would overflow the budget
                nxt = list(batch.items) + [self.ready[n]]
                assert cost_of(nxt, padded) > budget, "batch stopped before the budget was full"
            for _ in range(n):
                self.ready.popleft()
            self.fresh_budget_checked += 1
        self.in_flight[batch.batch_id] = (device, batch.items, batch.attempt, frozenset())

    def done(self, batch_id: int) -> None:
        del self.in_flight[batch_id]

    def oom(self, batch_id: int, given_up: bool) -> None:
        device, items, attempt, failed_on = self.in_flight.pop(batch_id)
        if len(items) > 1:
            half = len(items) // 2
            self.retry.append((items[:half], attempt + 1, frozenset()))
            self.retry.append((items[half:], attempt + 1, frozenset()))
        elif not given_up:
            self.retry.append((items, attempt + 1, failed_on | {device}))

    def lost(self, device: int) -> int:
        self.lost_devices.add(device)
        mine = [bid for bid, (dev, *_) in self.in_flight.items() if dev == device]
        count = 0
        for bid in mine:
            _, items, attempt, failed = self.in_flight.pop(bid)
            self.retry.append((items, attempt, failed))
            count += len(items)
        return count


@dataclass
class SimDevice:
    index: int
    speed: float
    """Tokens per virtual second."""
    capacity: int
    """Hidden: a batch costing more runs out of memory."""
    budget: TokenBudget
    depth: int = 1
    """Batches pulled ahead (the CUDA worker's prefetch)."""
    dies_at: float | None = None
    batches: int = 0
    ooms: int = 0
    lost: bool = False


@dataclass
class Scenario:
    name: str
    speeds: tuple[float, ...] = (1000.0, 1000.0, 200.0)
    """Device 0 is the fast one, the last device the 5x slower one."""
    capacities: tuple[int, ...] = (4096, 4096, 4096)
    maximum: int = 1024
    depth: int = 1
    n_items: int = 240
    lengths: tuple[int, int] = (5, 200)
    window: int = 32
    chunk_gap: float = 0.3
    huge: int = 0
    """Items of 3000 tokens: fit on no device, ever."""
    poison: int = 0
    """Items whose batch fails with a non-OOM error (``Scheduler.fail``)."""
    deaths: dict[int, float] = field(default_factory=dict)
    telemetry: tuple[tuple[float, int, int, int, float], ...] = ()
    """(time, device, new capacity, new memory budget, telemetry lag)."""
    max_solo: int = 2


HUGE_TOKENS = 3000
POLL = 0.05
OVERHEAD = 0.02

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


class Harness:
    """Runs one scenario: producer, telemetry and device processes on a :class:`Sim`."""

    def __init__(self, sc: Scenario, seed: int):
        self.sc, self.seed = sc, seed
        rng = random.Random(seed)
        self.items = [make_item(f"{sc.name}-{seed}-{i}", rng.randint(*sc.lengths))
                      for i in range(sc.n_items)]
        huge = [make_item(f"{sc.name}-{seed}-huge{i}", HUGE_TOKENS) for i in range(sc.huge)]
        for item in huge:
            self.items.insert(rng.randrange(len(self.items) + 1), item)
        self.huge = set(digests(huge))
        normal = [it for it in self.items if it.digest not in self.huge]
        self.poison = set(digests(rng.sample(normal, sc.poison)))
        self.sched = Scheduler(window=sc.window, max_solo_attempts=sc.max_solo)
        self.shadow = Shadow(sc.window)
        self.devices = [SimDevice(i, speed, cap, TokenBudget(sc.maximum, sc.maximum), sc.depth,
                                  sc.deaths.get(i))
                        for i, (speed, cap) in enumerate(zip(sc.speeds, sc.capacities))]
        self.completed: Counter[bytes] = Counter()
        self.given_up: Counter[bytes] = Counter()
        self.given_up_by_oom: set[bytes] = set()
        self.solo_ooms: Counter[bytes] = Counter()
        self.solo_failed_on: defaultdict[bytes, set[int]] = defaultdict(set)
        self.sim = Sim()

    # -- scheduler calls, each mirrored on the shadow model ---------------------------------
    def next_batch(self, dev: SimDevice) -> ScheduledBatch | None:
        budget = dev.budget.tokens()
        batch = self.sched.next_batch(dev.index, budget)
        self.shadow.next_batch(dev.index, budget, False, batch)
        if batch is not None:
            assert batch.device == dev.index and batch.items
        return batch

    def report(self, dev: SimDevice, batch: ScheduledBatch) -> None:
        cost = batch.n_tokens
        if any(it.digest in self.poison for it in batch.items):
            given = self.sched.fail(batch.batch_id)
            assert given == batch.items
            self._give_up(given)
            self.shadow.done(batch.batch_id)
        elif cost > dev.capacity:
            dev.ooms += 1
            dev.budget.after_oom(cost)
            assert dev.budget.tokens() <= max(MIN_TOKENS, int(cost * 0.7)), dev.budget.describe()
            solo = len(batch.items) == 1
            if solo:
                self.solo_ooms[batch.items[0].digest] += 1
                self.solo_failed_on[batch.items[0].digest].add(dev.index)
            given = self.sched.out_of_memory(batch.batch_id)
            live = {d.index for d in self.devices if not d.lost and d.batches + d.ooms > 0}
            if given:
                assert solo and given == batch.items
                digest = given[0].digest
                assert self.solo_ooms[digest] >= self.sc.max_solo, \
                    "given up before max_solo_attempts solo failures"
                assert live <= self.solo_failed_on[digest], \
                    "given up before every live device failed it alone"
                self.given_up_by_oom.add(digest)
            else:
                digest = batch.items[0].digest
                assert not solo or self.solo_ooms[digest] < self.sc.max_solo or \
                    not live <= self.solo_failed_on[digest]
            self._give_up(given)
            self.shadow.oom(batch.batch_id, bool(given))
        else:
            done = self.sched.complete(batch.batch_id)
            assert done.items == batch.items and done.device == dev.index
            self.completed.update(digests(batch.items))
            dev.budget.after_success(cost)
            dev.batches += 1
            self.shadow.done(batch.batch_id)

    def _give_up(self, items) -> None:
        self.given_up.update(digests(items))

    # -- processes -----------------------------------------------------------------------------
    def producer(self, sim: Sim) -> None:
        for start in range(0, len(self.items), self.sc.window):
            chunk = self.items[start:start + self.sc.window]
            self.sched.submit(chunk)
            self.shadow.submit(chunk)
            sim.sleep(self.sc.chunk_gap)
        self.sched.close()
        self.shadow.close()

    def telemetry(self, sim: Sim) -> None:
        events = []
        for at, dev, capacity, memory, lag in self.sc.telemetry:
            events.append((at, "capacity", dev, capacity))
            events.append((at + lag, "budget", dev, memory))
        for at, kind, dev, value in sorted(events):
            sim.sleep(at - sim.now)
            if kind == "capacity":
                self.devices[dev].capacity = value  # another process takes (or frees) memory
            else:
                self.devices[dev].budget.set_memory_tokens(value)  # telemetry notices

    def device(self, dev: SimDevice):
        def body(sim: Sim) -> None:
            local: deque[ScheduledBatch] = deque()
            while True:
                if dev.dies_at is not None and sim.now >= dev.dies_at:
                    return self._die(dev, local)
                while len(local) < dev.depth:
                    batch = self.next_batch(dev)
                    if batch is None:
                        break
                    local.append(batch)
                if not local:
                    if self.sched.finished:
                        return
                    sim.sleep(POLL)
                    continue
                batch = local[0]
                duration = OVERHEAD + batch.n_tokens / dev.speed
                if dev.dies_at is not None and sim.now + duration > dev.dies_at:
                    sim.sleep(dev.dies_at - sim.now)
                    return self._die(dev, local)  # mid-batch: nothing is reported
                sim.sleep(duration)
                local.popleft()
                self.report(dev, batch)
        return body

    def _die(self, dev: SimDevice, local) -> None:
        dev.lost = True
        expected = self.shadow.lost(dev.index)
        assert expected == sum(len(b.items) for b in local)
        assert self.sched.device_lost(dev.index) == expected
        assert self.sched.next_batch(dev.index, dev.budget.tokens()) is None, \
            "a lost device was given work"

    def run(self) -> None:
        self.sim.spawn("producer", self.producer)
        if self.sc.telemetry:
            self.sim.spawn("telemetry", self.telemetry)
        for dev in self.devices:
            self.sim.spawn(f"device{dev.index}", self.device(dev))
        self.sim.run()

    # -- end-of-run properties -----------------------------------------------------------
    def check(self) -> None:
        submitted = set(digests(self.items))
        assert len(submitted) == len(self.items)
        twice = [d for d, c in (self.completed + self.given_up).items() if c > 1]
        assert not twice, f"{len(twice)} items completed/given up more than once"
        both = set(self.completed) & set(self.given_up)
        assert not both, f"{len(both)} items both completed and given up"
        lost = submitted - set(self.completed) - set(self.given_up)
        assert not lost, f"{len(lost)} items neither completed nor given up"
        assert self.sched.finished and self.sched.pending() == 0
        stats = self.sched.stats
        assert stats.submitted == len(self.items)
        assert stats.completed == len(self.completed)
        assert stats.failed == len(self.given_up)
        # the items that fit nowhere are given up (by OOM), nothing else is given up by OOM
        assert self.given_up_by_oom == self.huge
        assert self.huge.isdisjoint(self.completed)
        assert self.poison <= set(self.given_up)
        # every other item that was given up shared a failing batch with a poisoned item
        if not self.poison:
            assert set(self.given_up) == self.huge
        # the fast device did more than the 5x slower one
        fast, slow = self.devices[0], self.devices[-1]
        assert not fast.lost and not slow.lost
        assert fast.batches > slow.batches, (fast.batches, slow.batches)
        assert self.shadow.fresh_budget_checked > 0 and not self.shadow.in_flight
        assert not self.shadow.retry and not self.shadow.ready and not self.shadow.intake


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
