"""The per-device thread: pull a batch, run it, hand the result on.

One :class:`DeviceWorker` owns one :class:`~gpuengine.runner.Runner` (one replica). It never
decides what to run (the scheduler does) and never writes the store (the engine does). Out of
memory is handled *after* leaving the ``except`` block, so the failed frame's tensors are
released before the cache is emptied and the batch is split.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from gpuengine.budget import TokenBudget
from gpuengine.runner import EmbeddedBatch, Runner
from gpuengine.scheduler import ScheduledBatch, Scheduler

log = logging.getLogger(__name__)


@dataclass
class DeviceStats:
    name: str
    batches: int = 0
    sequences: int = 0
    tokens: int = 0
    busy_seconds: float = 0.0
    oom_events: int = 0
    started: float = field(default_factory=time.perf_counter)

    def tokens_per_second(self) -> float:
        return self.tokens / self.busy_seconds if self.busy_seconds else 0.0


@dataclass(frozen=True)
class BatchOutcome:
    """What a worker reports for one batch."""

    kind: str
    """``ok``, ``oom`` or ``error``."""
    device: int
    batch: ScheduledBatch
    result: EmbeddedBatch | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class WorkerExit:
    device: int
    error: BaseException | None = None


class DeviceWorker(threading.Thread):
    def __init__(self, index: int, runner: Runner, budget: TokenBudget, scheduler: Scheduler,
                 outbox: queue.Queue, stop: threading.Event):
        super().__init__(name=f"gpuengine-device-{index}", daemon=True)
        self.index = index
        self.runner = runner
        self.budget = budget
        self.scheduler = scheduler
        self.outbox = outbox
        self.stop_event = stop
        self.stats = DeviceStats(str(runner.device))

    def run(self) -> None:
        error = None
        try:
            self._loop()
        except BaseException as exc:  # reported to the engine, which decides
            error = exc
        self.outbox.put(WorkerExit(self.index, error))

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            batch = self.scheduler.next_batch(self.index, self.budget.tokens(),
                                              padded=self.runner.padded, timeout=0.2)
            if batch is None:
                if self.scheduler.finished:
                    return
                continue
            outcome = self._run_one(batch)
            if outcome.kind == "oom":
                self.stats.oom_events += 1
                self.budget.after_oom(batch.n_tokens)
                self.runner.release_cached_memory()
            self.outbox.put(outcome)

    def _run_one(self, batch: ScheduledBatch) -> BatchOutcome:
        try:
            result = self.runner.embed(batch.items)
        except Exception as exc:  # classify outside, after the frame is gone
            kind = "oom" if _is_oom(exc) else "error"
            return BatchOutcome(kind, self.index, batch, error=None if kind == "oom" else exc)
        self.stats.batches += 1
        self.stats.sequences += len(batch.items)
        self.stats.tokens += result.n_tokens
        self.stats.busy_seconds += result.seconds
        self.budget.after_success(batch.n_tokens)
        return BatchOutcome("ok", self.index, batch, result)


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
