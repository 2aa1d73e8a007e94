"""Shared by the benchmark scripts: drive the engine's device worker over prepared items, and
profile a runner's kernels."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import torch

from gpuengine.budget import TokenBudget
from gpuengine.scheduler import Scheduler
from gpuengine.worker import DeviceWorker, WorkerExit


def drive_worker(runner, items, budget: int, depth: int = 2) -> dict:
    """The engine's device pipeline without input parsing or the store: scheduler → worker
    thread (stage + launch batch k+1, then finish batch k) → results, after a warm-up batch at
    the full budget. Returns tokens, residues, sequences, seconds and the busy fraction."""
    runner.calibrate(budget)
    sched = Scheduler()
    sched.submit(items)
    sched.close()
    outbox, halt = queue.Queue(), threading.Event()
    worker = DeviceWorker(0, runner, TokenBudget(budget, budget), sched, outbox, halt, depth=depth)
    torch.cuda.synchronize()
    start = time.perf_counter()
    worker.start()
    tokens = residues = sequences = 0
    while True:
        msg = outbox.get()
        if isinstance(msg, WorkerExit):
            if msg.error:
                raise msg.error
            break
        assert msg.kind == "ok", msg
        sched.complete(msg.batch.batch_id)
        tokens += msg.batch.n_tokens
        residues += sum(i.residues for i in msg.batch.items)
        sequences += len(msg.batch.items)
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "residues": residues, "sequences": sequences, "seconds": seconds,
            "busy_fraction": worker.stats.busy_seconds / seconds}


def profile_batches(runner, items, budget: int, path: Path, row_limit: int = 25) -> str:
    """Kernel time breakdown (torch.profiler) of two full batches after a warm-up batch;
    printed and written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    sched = Scheduler()
    sched.submit(items)
    sched.close()
    batches = [sched.next_batch(0, budget).items for _ in range(3)]
    runner.embed(batches[0])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b in batches[1:]:
            runner.embed(b)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=row_limit,
                                      max_name_column_width=60)
    print(table, flush=True)
    Path(path).write_text(table)
    return table
