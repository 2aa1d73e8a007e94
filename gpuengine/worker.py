"""The per-device thread: pull a batch, stage and launch it, finish the one before.

One :class:`DeviceWorker` owns one :class:`~gpuengine.runner.Runner` (one replica) and one
thread. It never decides what to run (the scheduler does) and never writes the store (the
engine does). The loop keeps ``depth`` batches in flight: it stages and launches batch k + 1
(asynchronous on the GPU) before it waits for batch k's event and copies k's vectors out, so
the host work of one batch (packing, pooling bookkeeping, the copy out) overlaps the GPU work
of the next. Each wait is on one batch's event, never a device-wide sync.

Out of memory is handled *after* leaving the ``except`` block, so the failed frame's tensors
are released before the cache is emptied and the scheduler splits the batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass

from gpuengine.budget import TokenBudget
from gpuengine.packing import batch_cost
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
    """Sum of per-batch device time from CUDA events (the compute's wall time on the CPU);
    batches never overlap in it, so it is at most the run's wall time."""
    oom_events: int = 0


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


class DeviceWorker:
    """One replica's thread; ``name`` labels it in stats and progress (``cuda:0``, or
    ``cuda:0#1`` for the second replica on a device)."""

    def __init__(self, index: int, runner: Runner, budget: TokenBudget, scheduler: Scheduler,
                 outbox: queue.Queue, halt: threading.Event, *, depth: int = 2,
                 name: str | None = None):
        self.index = index
        self.runner = runner
        self.budget = budget
        self.scheduler = scheduler
        self.outbox = outbox
        self.halt = halt
        self.depth = max(1, depth)
        self.stats = DeviceStats(name or str(runner.device))
        # joined by the engine on every path; daemon only so that a bug cannot hang the exit
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"gpuengine-device-{index}")

    def start(self) -> None:
        self._thread.start()

    @property
    def name(self) -> str:
        return self._thread.name

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end: it does once the halt event is set (or the scheduler
        is finished) and its batches in flight are done."""
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _next_batch(self, wait: bool) -> ScheduledBatch | None:
        """Work within the current budget; None when there is none (now, or any more)."""
        while not self.halt.is_set():
            batch = self.scheduler.next_batch(self.index, self.budget.tokens(),
                                              padded=self.runner.padded,
                                              timeout=0.2 if wait else None)
            if batch is not None or not wait or self.scheduler.finished:
                return batch
        return None

    def _run(self) -> None:
        error = None
        in_flight: deque = deque()
        try:
            while True:
                batch = self._next_batch(wait=not in_flight)
                if batch is not None:
                    launched = self._launch(batch)
                    if launched is not None:
                        in_flight.append((batch, launched))
                if in_flight and (len(in_flight) >= self.depth or batch is None):
                    self._finish(*in_flight.popleft())
                elif batch is None and not in_flight:
                    return
        except BaseException as exc:  # reported to the engine, which decides
            error = exc
        finally:
            self.outbox.put(WorkerExit(self.index, error))

    def _launch(self, batch: ScheduledBatch):
        oom = False
        try:
            launched = self.runner.launch(self.runner.stage(batch.block))
            self.budget.launched(batch.n_tokens)  # in the allocator's peak from now on
            return launched
        except Exception as exc:
            if not _is_oom(exc):
                self.outbox.put(BatchOutcome("error", self.index, batch, error=exc))
                return None
            oom = True  # recover below, once this frame's tensors are released
        if oom:
            self.stats.oom_events += 1
            self.budget.after_oom(batch_cost(len(batch.block), batch.n_tokens, batch.max_len,
                                             self.runner.padded))
            self.runner.release_cached_memory()
            self.outbox.put(BatchOutcome("oom", self.index, batch))
        return None

    def _finish(self, batch: ScheduledBatch, launched) -> None:
        result = self.runner.finish(launched)
        stats = self.stats
        stats.batches += 1
        stats.sequences += len(batch.block)
        stats.tokens += result.n_tokens
        stats.busy_seconds += result.seconds
        self.budget.after_success(result.n_tokens)  # the budget also keeps the largest batch
        self.outbox.put(BatchOutcome("ok", self.index, batch, result))


def device_rows(workers: list[DeviceWorker], seconds: float) -> list[dict]:
    """The summary's row per replica. One definition of tokens/s everywhere: tokens over
    the embedding time, so the replicas' rates add up to the run's; busy is the replica's
    compute time over it; share is its part of the run's tokens; budget its token budget
    at the end (on a GPU: its share of the device's memory, or less after an OOM)."""
    total = sum(w.stats.tokens for w in workers)
    return [{"device": w.stats.name, "batches": w.stats.batches,
             "sequences": w.stats.sequences, "tokens": w.stats.tokens,
             "busy_seconds": w.stats.busy_seconds,
             "busy_fraction": min(1.0, w.stats.busy_seconds / seconds) if seconds else 0.0,
             "tokens_per_second": w.stats.tokens / seconds if seconds else 0.0,
             "share": w.stats.tokens / total if total else 0.0,
             "budget_tokens": w.budget.tokens(),
             "oom_events": w.stats.oom_events} for w in workers]


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
