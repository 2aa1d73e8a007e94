"""A deterministic simulation of devices around :class:`gpuengine.scheduler.Scheduler`.

Each simulated device is a real thread, but the threads are stepped one at a time on a
*virtual* clock (:class:`Sim`), so a run is deterministic for a seed and costs no real
sleeping. Devices (:class:`SimDevice`) have uneven speeds, a hidden real capacity (a batch above
it runs out of memory and the device lowers its :class:`~gpuengine.budget.TokenBudget` with
``after_oom``, as the worker does), scripted telemetry, prefetch depth, items that fit nowhere,
items whose batches fail, and deaths mid-run (the harness calls ``device_lost`` as the engine
does on a worker's exit). :class:`Shadow` models the documented policy and checks every
decision as it is made: retries first, windows length-sorted, greedy fill within the budget,
oversized items alone. A :class:`Scenario` describes one run; :class:`Harness` runs it.
Used by test_scheduler.py.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
from collections import defaultdict, Counter, deque
from dataclasses import dataclass, field

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
        # the simulated producer submits everything at once, on the virtual clock: no wait
        # for room (test_scheduler_room.py tests that wait with real threads)
        self.sched = Scheduler(window=sc.window, max_solo_attempts=sc.max_solo,
                               max_queued=1 << 40)
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
