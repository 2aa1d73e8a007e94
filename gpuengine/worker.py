"""Per-device threads: a prefetch thread stages batches, a compute thread launches them.

One :class:`DeviceWorker` owns one :class:`~gpuengine.runner.Runner` (one replica). It never
decides what to run (the scheduler does) and never writes the store (the engine does).

* The **prefetch thread** asks the scheduler for work whenever fewer than ``depth`` batches are
  staged or running, with the device's current token budget, and stages each batch (pinned
  host buffer, copy stream).
* The **compute thread** launches staged batches on the compute stream and hands each one to
  the engine as soon as it is launched; before launching a new batch it waits (on that batch's
  event only) until at most ``depth`` are running, so the host never runs far ahead.

Out of memory is handled *after* leaving the ``except`` block, so the failed frame's tensors are
released before the cache is emptied and the scheduler splits the batch. On the CPU both steps
run in the compute thread, synchronously.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from gpuengine.budget import TokenBudget
from gpuengine.runner import Launched, Runner, Staged
from gpuengine.scheduler import ScheduledBatch, Scheduler

log = logging.getLogger(__name__)


@dataclass
class DeviceStats:
    name: str
    batches: int = 0
    sequences: int = 0
    tokens: int = 0
    busy_seconds: float = 0.0
    """Sum of per-batch device time from CUDA events (wall time on the CPU)."""
    oom_events: int = 0
    started: float = field(default_factory=time.perf_counter)

    def tokens_per_second(self) -> float:
        return self.tokens / self.busy_seconds if self.busy_seconds else 0.0


@dataclass(frozen=True)
class BatchOutcome:
    """What a worker reports for one batch; ``launched`` is finished by the engine."""

    kind: str
    """``ok``, ``oom`` or ``error``."""
    device: int
    batch: ScheduledBatch
    launched: Launched | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class WorkerExit:
    device: int
    error: BaseException | None = None


class DeviceWorker:
    def __init__(self, index: int, runner: Runner, budget: TokenBudget, scheduler: Scheduler,
                 outbox: queue.Queue, halt: threading.Event, *, depth: int = 2):
        self.index = index
        self.runner = runner
        self.budget = budget
        self.scheduler = scheduler
        self.outbox = outbox
        self.halt = halt
        self.depth = depth
        self.stats = DeviceStats(str(runner.device))
        self._staged: queue.Queue[tuple[ScheduledBatch, Staged] | None] = queue.Queue(maxsize=1)
        self._prefetch_error: BaseException | None = None
        self._threads = [threading.Thread(target=self._compute_loop, daemon=True,
                                          name=f"gpuengine-compute-{index}")]
        if runner.cuda:
            self._threads.append(threading.Thread(target=self._prefetch_loop, daemon=True,
                                                  name=f"gpuengine-prefetch-{index}"))

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def batch_finished(self, busy_seconds: float, batch: ScheduledBatch) -> None:
        """Called by the engine once a batch's results are on the host."""
        self.stats.batches += 1
        self.stats.sequences += len(batch.items)
        self.stats.tokens += batch.n_tokens
        self.stats.busy_seconds += busy_seconds
        self.budget.after_success(batch.n_tokens)

    # -- threads ------------------------------------------------------------------------------
    def _next_batch(self) -> ScheduledBatch | None:
        """Wait for work; None when there is no more (or the run is halting)."""
        while not self.halt.is_set():
            batch = self.scheduler.next_batch(self.index, self.budget.tokens(),
                                              padded=self.runner.padded, timeout=0.2)
            if batch is not None:
                return batch
            if self.scheduler.finished:
                return None
        return None

    def _prefetch_loop(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                staged = self.runner.stage(batch.items)
                self._staged.put((batch, staged))
        except BaseException as exc:  # staging failed: the device is unusable
            self._prefetch_error = exc
        finally:
            self._staged.put(None)

    def _compute_loop(self) -> None:
        error = None
        running: deque = deque()
        try:
            while True:
                if self.runner.cuda:
                    job = self._staged.get()
                    if job is None:
                        if self._prefetch_error is not None:
                            raise self._prefetch_error
                        break
                    batch, staged = job
                else:
                    batch = self._next_batch()
                    if batch is None:
                        break
                    staged = None
                while len(running) >= self.depth:
                    running.popleft().synchronize()  # one batch's event, not the device
                outcome = self._launch(batch, staged)
                done = getattr(outcome.launched, "done", None)
                if done is not None:
                    running.append(done)
                if outcome.kind == "oom":
                    self.stats.oom_events += 1
                    self.budget.after_oom(batch.n_tokens)
                    self.runner.release_cached_memory()
                self.outbox.put(outcome)
        except BaseException as exc:  # reported to the engine, which decides
            error = exc
        self.outbox.put(WorkerExit(self.index, error))

    def _launch(self, batch: ScheduledBatch, staged: Staged | None) -> BatchOutcome:
        try:
            if staged is None:
                staged = self.runner.stage(batch.items)
            launched = self.runner.launch(staged)
        except Exception as exc:  # classified here; OOM recovery happens after the frame is gone
            if _is_oom(exc):
                return BatchOutcome("oom", self.index, batch)
            return BatchOutcome("error", self.index, batch, error=exc)
        return BatchOutcome("ok", self.index, batch, launched)


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
