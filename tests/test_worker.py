"""``gpuengine.worker.DeviceWorker`` on the CPU with stand-in runners (real threads, a real
:class:`~gpuengine.scheduler.Scheduler` and :class:`~gpuengine.budget.TokenBudget`): it reports
each batch to its budget, and an out-of-memory error lowers a padded runner's budget in padded
units. The worker inside the whole engine is tested in test_engine_faults.py."""

from __future__ import annotations

import threading

import numpy as np
import torch

from conftest import cost_of, make_item
from gpuengine.budget import TokenBudget
from gpuengine.scheduler import Scheduler


def test_worker_reports_its_batches_to_its_budget():
    import queue

    from gpuengine.runner import EmbeddedBatch
    from gpuengine.worker import DeviceWorker, WorkerExit

    class Counting:
        device, cuda, padded, precision, outputs = torch.device("cpu"), False, False, "fp32", ()

        def stage(self, items):
            return items

        def launch(self, staged):
            return staged

        def finish(self, items):
            return EmbeddedBatch({}, np.ones(len(items), bool), sum(i.n_tokens for i in items), 0.0)

    s = Scheduler()
    s.submit([make_item(f"i{n}", n) for n in (40, 60, 100, 200)])
    s.close()
    budget = TokenBudget(256, 256)
    outbox: queue.Queue = queue.Queue()
    DeviceWorker(0, Counting(), budget, s, outbox, threading.Event()).start()
    sizes = []
    while not isinstance(message := outbox.get(timeout=10), WorkerExit):
        s.complete(message.batch.batch_id)  # as the engine loop does
        sizes.append(message.result.n_tokens)
    assert message.error is None and len(sizes) >= 2 and sum(sizes) == 400
    assert budget.take_largest_batch() == max(sizes)


def test_worker_lowers_a_padded_budget_in_padded_units():
    import queue

    from gpuengine.worker import DeviceWorker, WorkerExit

    class PaddedOOM:
        device, cuda, padded, precision = torch.device("cpu"), False, True, "fp32"

        def stage(self, items):
            return items

        def launch(self, staged):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        def release_cached_memory(self):
            pass

    s = Scheduler()
    s.submit([make_item("short", 10), make_item("long", 100)])
    s.close()
    budget = TokenBudget(512, 512)
    outbox: queue.Queue = queue.Queue()
    halt = threading.Event()
    DeviceWorker(0, PaddedOOM(), budget, s, outbox, halt).start()
    try:
        outcome = outbox.get(timeout=5)
    finally:
        halt.set()
    assert isinstance(outbox.get(timeout=5), WorkerExit)
    assert outcome.kind == "oom" and len(outcome.batch.items) == 2
    padded_cost = cost_of(outcome.batch.items, padded=True)  # 2 x 100 = 200
    assert budget.tokens() == int(0.7 * padded_cost), budget.describe()
