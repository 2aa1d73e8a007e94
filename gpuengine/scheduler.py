"""The central scheduler: which work items go to which device, and what to retry (torch-free).

Policy, in order:

0. The planner may lead the devices by ``max_queued`` items, not by the input: a submission
   waits while the intake and the ready queue hold that many (until a device takes a batch,
   or the run halts: then the submission is dropped, as the run ends). Without the wait a
   planner faster than its GPUs queued nearly every read of the input, in memory.
1. Items arrive from the planner into an *intake* window. When the window is full, the input
   ends, or a device finds nothing ready, the window is sorted by length and appended to the
   *ready* queue (a sliding window: memory is bounded by the window, not the input).
2. A device asks (pull-based) with its current token budget. Retried batches come first, as
   they were split; otherwise ready items are taken from the front until the next one would
   overflow the budget. One item larger than the budget still goes alone (it may fit; if it
   does not, step 4 reports it).
3. The decision is a frozen :class:`ScheduledBatch`; the batch stays *in flight* until the
   device reports it done, out of memory, or lost.
4. Out of memory: the batch is split in two halves that go to the front of the retry queue.
   A retried batch larger than the asking device's budget is cut to the prefix that fits.
   A single item that ran out of memory alone is offered first to devices that have not
   failed it; it is given up (returned to the caller to report) only once it has failed
   ``max_solo_attempts`` times and on every live device; nothing is retried forever.
5. A lost device's in-flight batches go back to the retry queue for the other devices; the
   lost device gets no more work.

Waiting devices are woken one at a time: new work wakes one, and a device that takes a batch
and leaves work behind wakes the next (a baton), so a submit costs one wake-up, not one per
device; retries, a lost device and the end of the run wake them all.

Every item is in exactly one of intake, ready, retry, in flight, done or failed, so nothing is
lost or duplicated whatever order the reports come in.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections import deque
from itertools import accumulate
from operator import mul
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np

from gpuengine.packing import ItemBlock, WorkItem, batch_cost


@dataclass(frozen=True)
class ScheduledBatch:
    batch_id: int
    device: int
    block: ItemBlock
    """The batch's items, column-wise (what the runner stages and the engine commits)."""
    attempt: int
    """0 for a first try; > 0 for a batch split after an out-of-memory error."""

    @cached_property
    def items(self) -> tuple[WorkItem, ...]:
        """The items one by one (made on demand: the hot path reads :attr:`block`)."""
        return tuple(self.block)

    @cached_property
    def n_tokens(self) -> int:
        return sum(self.block.n_tokens)

    @cached_property
    def max_len(self) -> int:
        return max(self.block.n_tokens)


@dataclass
class _Retry:
    items: ItemBlock
    attempt: int
    solo_failures: int = 0
    failed_on: frozenset[int] = frozenset()
    """Devices on which this (single) item ran out of memory alone."""


@dataclass
class SchedulerStats:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    oom_splits: int = 0
    requeued_after_loss: int = 0
    per_device_batches: dict[int, int] = field(default_factory=dict)


class Scheduler:
    """Thread-safe; see the module docstring for the policy."""

    def __init__(self, *, window: int = 50_000, max_solo_attempts: int = 2,
                 max_queued: int | None = None, halt: threading.Event | None = None):
        self._window = window
        self._max_solo = max_solo_attempts
        self._max_queued = max(window, max_queued or 4 * window)
        """Items the intake and the ready queue may hold before a submission waits."""
        self._halt = halt
        """Set when the run halts: a waiting submission gives up."""
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        """Where devices wait for work."""
        self._room = threading.Condition(self._lock)
        """Where a submission waits for the queue to shrink (only the planner's thread)."""
        self._intake: list[ItemBlock] = []
        self._intake_count = 0
        self._intake_sizes: list[np.ndarray] = []
        """The intake's token counts, one array per submission."""
        self._ready = _Ready()
        self._retry: deque[_Retry] = deque()
        self._in_flight: dict[int, tuple[int, _Retry]] = {}
        self._lost: set[int] = set()
        self._closed = False
        self._next_id = 0
        self.stats = SchedulerStats()

    # -- input side ---------------------------------------------------------------------
    def submit(self, items: ItemBlock | Iterable[WorkItem],
               n_tokens: np.ndarray | None = None) -> None:
        """Items (a block, or work items) for the intake window; ``n_tokens``, when the
        caller has them as an array, their token counts (else read from the items)."""
        block = ItemBlock.of(items)
        if n_tokens is None:
            n_tokens = np.asarray(block.n_tokens, np.int64)
        elif len(n_tokens) != len(block):
            raise ValueError(f"{len(block)} items with {len(n_tokens)} token counts")
        with self._cv:
            while self._intake_count + len(self._ready) >= self._max_queued:
                if self._halt is not None and self._halt.is_set():
                    return  # the run ends: what it did not plan is done by the next
                self._room.wait(0.2)
            self._intake.append(block)
            self._intake_count += len(block)
            self._intake_sizes.append(n_tokens)
            self.stats.submitted += len(block)
            if self._intake_count >= self._window:
                self._flush_intake()
            self._cv.notify()  # one waiter; a device that takes work passes the baton on

    def close(self) -> None:
        """No more input will come."""
        with self._cv:
            self._closed = True
            self._flush_intake()
            self._cv.notify_all()

    def _flush_intake(self) -> None:
        """The intake, in a stable sort by token count, to the ready queue."""
        if self._intake_count:
            sizes = np.concatenate(self._intake_sizes)
            order = np.argsort(sizes, kind="stable")
            self._ready.extend(ItemBlock.concat(self._intake).take(order.tolist()), sizes[order])
        self._intake, self._intake_sizes, self._intake_count = [], [], 0

    # -- device side ----------------------------------------------------------------------
    def next_batch(self, device: int, budget: int, *, padded: bool = False,
                   timeout: float | None = None) -> ScheduledBatch | None:
        """Work for ``device`` within ``budget`` tokens; waits up to ``timeout`` seconds for
        some (None: do not wait). Returns None when there is nothing (yet, or any more)."""
        with self._cv:
            if device in self._lost:
                return None
            if not self._has_work():
                self._flush_intake()
            if timeout and not self._has_work_for(device) and not self.finished_locked():
                self._cv.wait_for(lambda: self._has_work_for(device) or self._intake_count > 0
                                  or self.finished_locked() or device in self._lost, timeout)
                if not self._has_work_for(device):
                    self._flush_intake()
            if device in self._lost:
                return None
            retry = self._take(device, budget, padded)
            if retry is None:
                return None
            if self._has_work() or self._intake_count:
                self._cv.notify()  # the baton: another waiting device may take the rest
            self._room.notify()  # a waiting submission may have room now
            batch_id = self._next_id
            self._next_id += 1
            self._in_flight[batch_id] = (device, retry)
            self.stats.per_device_batches[device] = self.stats.per_device_batches.get(device, 0) + 1
            return ScheduledBatch(batch_id, device, retry.items, retry.attempt)

    def _has_work(self) -> bool:
        return bool(self._retry or self._ready)

    def _has_work_for(self, device: int) -> bool:
        return bool(self._ready) or self._retry_for(device) is not None

    def _live_devices(self) -> set[int]:
        return set(self.stats.per_device_batches) - self._lost

    def _retry_for(self, device: int) -> int | None:
        """Index of the first retry ``device`` should take: one it has not failed, or one that
        every live device has failed already."""
        live = self._live_devices() | {device}
        for index, retry in enumerate(self._retry):
            if device not in retry.failed_on or live <= retry.failed_on:
                return index
        return None

    def _take(self, device: int, budget: int, padded: bool) -> _Retry | None:
        index = self._retry_for(device)
        if index is not None:
            retry = self._retry[index]
            del self._retry[index]
            fits = _prefix_within(retry.items.n_tokens, budget, padded)
            if fits < len(retry.items):
                self._retry.insert(index, _Retry(retry.items[fits:], retry.attempt))
                retry = _Retry(retry.items[:fits], retry.attempt)
            return retry
        if not self._ready:
            return None
        return _Retry(self._ready.take(budget, padded), attempt=0)

    def complete(self, batch_id: int) -> ScheduledBatch:
        """The batch's results were handed on; returns it."""
        with self._cv:
            device, retry = self._in_flight.pop(batch_id)
            self.stats.completed += len(retry.items)
            if self.finished_locked():
                self._cv.notify_all()
            return ScheduledBatch(batch_id, device, retry.items, retry.attempt)

    def out_of_memory(self, batch_id: int) -> tuple[WorkItem, ...]:
        """Split and requeue; returns items given up (a single item that failed alone too often)."""
        with self._cv:
            device, retry = self._in_flight.pop(batch_id)
            items = retry.items
            given_up: tuple[WorkItem, ...] = ()
            if len(items) == 1:
                failed_on = retry.failed_on | {device}
                tried_everywhere = self._live_devices() <= failed_on
                if retry.solo_failures + 1 >= self._max_solo and tried_everywhere:
                    given_up = tuple(items)
                    self.stats.failed += 1
                else:
                    self._retry.appendleft(_Retry(items, retry.attempt + 1,
                                                  retry.solo_failures + 1, failed_on))
            else:
                half = len(items) // 2
                self.stats.oom_splits += 1
                self._retry.appendleft(_Retry(items[half:], retry.attempt + 1))
                self._retry.appendleft(_Retry(items[:half], retry.attempt + 1))
            self._cv.notify_all()
            return given_up

    def fail(self, batch_id: int) -> tuple[WorkItem, ...]:
        """Give up a batch's items (e.g. a non-OOM error on a single item); returns them."""
        with self._cv:
            _, retry = self._in_flight.pop(batch_id)
            self.stats.failed += len(retry.items)
            self._cv.notify_all()
            return tuple(retry.items)

    def device_lost(self, device: int) -> int:
        """Requeue every batch in flight on ``device``; returns how many items were requeued."""
        with self._cv:
            self._lost.add(device)
            mine = [bid for bid, (dev, _) in self._in_flight.items() if dev == device]
            count = 0
            for bid in mine:
                _, retry = self._in_flight.pop(bid)
                self._retry.appendleft(retry)
                count += len(retry.items)
            self.stats.requeued_after_loss += count
            self._cv.notify_all()
            return count

    # -- state -----------------------------------------------------------------------------
    def _closed_and_drained(self) -> bool:
        return self._closed and not self._intake_count and not self._ready and not self._retry

    def finished_locked(self) -> bool:
        return self._closed_and_drained() and not self._in_flight

    @property
    def finished(self) -> bool:
        with self._cv:
            return self.finished_locked()

    def pending(self) -> int:
        """Items not yet completed or failed (intake, ready, retry and in flight)."""
        with self._cv:
            flying = sum(len(r.items) for _, r in self._in_flight.values())
            return self._intake_count + len(self._ready) + sum(len(r.items) for r in self._retry) + flying

    def in_flight(self, device: int | None = None) -> list[int]:
        with self._cv:
            return [bid for bid, (dev, _) in self._in_flight.items() if device is None or dev == device]


class _Ready:
    """The ready queue: items in the order they are handed out (one :class:`ItemBlock`),
    taken from the front by :meth:`take` with the batch's cut found by a binary search in
    running token sums made once per item when it arrives (C-level ``cumsum``), not a step
    per item (the block and the position of its front, compacted as it is consumed)."""

    _FIRST_LOOK = 256
    """Items looked at first when cutting a padded batch (doubled while they all fit)."""

    def __init__(self) -> None:
        self._block = ItemBlock([], [], [], [], ())
        self._before: list[int] = [0]
        """Tokens of the items before each position (one more entry than the block: the
        last is the total; counted from the start of the run, never rebased)."""
        self._head = 0

    def __len__(self) -> int:
        return len(self._block) - self._head

    def __bool__(self) -> bool:
        return self._head < len(self._block)

    def extend(self, items: ItemBlock | Iterable[WorkItem],
               n_tokens: np.ndarray | None = None) -> None:
        """``items`` at the back (``n_tokens``: their token counts, if the caller has them)."""
        block = ItemBlock.of(items)
        if self._head > 4096 and self._head * 2 > len(self._block):
            self._block.drop_front(self._head)
            del self._before[:self._head]
            self._head = 0
        self._block.extend(block)
        if n_tokens is None:
            n_tokens = np.asarray(block.n_tokens, np.int64)
        before = np.cumsum(n_tokens, dtype=np.int64)
        before += self._before[-1]
        self._before.extend(before.tolist())

    def take(self, budget: int, padded: bool) -> ItemBlock:
        """The longest prefix whose :func:`batch_cost` fits ``budget`` (at least one item)."""
        head = self._head
        if padded:
            fits = self._padded_fits(budget)
        else:  # the prefix of m items costs before[head + m] - before[head]
            before = self._before
            fits = max(1, bisect_right(before, before[head] + budget, head + 1) - head - 1)
        self._head = head + fits
        return self._block[head:head + fits]

    def _padded_fits(self, budget: int) -> int:
        """How many items from the front fit ``budget`` padded: N × the longest."""
        n_tokens, head = self._block.n_tokens, self._head
        look, end = self._FIRST_LOOK, len(n_tokens)
        while True:
            stop = min(end, head + look)
            sizes = n_tokens[head:stop]
            # batch_cost of each prefix, which only grows
            costs = list(map(mul, range(1, len(sizes) + 1), accumulate(sizes, max)))
            fits = max(1, bisect_right(costs, budget))
            if fits < len(sizes) or stop == end:
                return fits
            look *= 2


def _prefix_within(n_tokens: Sequence[int], budget: int, padded: bool) -> int:
    """How many leading items (of these token counts) fit in ``budget`` (at least one)."""
    total = longest = 0
    for count, size in enumerate(n_tokens, start=1):
        total += size
        longest = max(longest, size)
        if count > 1 and batch_cost(count, total, longest, padded) > budget:
            return count - 1
    return len(n_tokens)
