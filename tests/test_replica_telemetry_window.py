"""The GPU memory telemetry compares the allocator's peak with the batches of the same span
(issue 16: ``serve --replicas-per-gpu 2`` crawled on the H200).

bytes per token = (peak since the last look − weights) / (largest batches since the last look),
and it only ever rises. A run's first look used to divide the peak of the warm-up calibration
(a full 65,536-token batch) or of the previous run's last batches by a stale "largest batch"
(the daemon's one-record start-up run: 18 tokens) whenever no batch of the new run had finished
within its first second: bytes per token rose some thousandfold and every budget fell to a few
hundred tokens for the rest of the daemon's life. Simulated devices (tests/fake_gpu.py), no
GPU needed.
"""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest
import torch

from fake_gpu import device_group as _group, install

PER_TOKEN = 30_000
FULL = 65_536
STARTUP_RECORD_TOKENS = 18


@pytest.fixture
def gpu(monkeypatch):
    return install(monkeypatch)


def _first_look_of_a_run(group) -> None:
    """What a run does before its first batch finishes: start the telemetry (the engine's
    call), then the telemetry thread's first look."""
    from gpuengine.replicas import start_telemetry

    telemetry = start_telemetry(group)
    telemetry.stop()  # its first look is taken here, by hand, before any batch finished
    group[0].memory.refresh()


def test_the_warm_up_calibration_peak_does_not_count_against_a_later_batch(gpu):
    group = _group(gpu, 2, PER_TOKEN, estimate=PER_TOKEN, max_tokens=FULL)
    memory = group[0].memory
    before = [r.budget.tokens() for r in group]
    assert before == [FULL, FULL] and memory.bytes_per_token == PER_TOKEN
    group[0].budget.after_success(STARTUP_RECORD_TOKENS)  # the daemon's start-up run
    _first_look_of_a_run(group)
    assert memory.bytes_per_token == PER_TOKEN
    assert [r.budget.tokens() for r in group] == before


def test_a_previous_runs_peak_does_not_count_against_the_next_runs_first_look(gpu):
    group = _group(gpu, 2, PER_TOKEN, estimate=PER_TOKEN, max_tokens=FULL)
    memory = group[0].memory
    before = [r.budget.tokens() for r in group]
    # the previous run: a full batch, then the one record, both after its last look
    gpu.peak = gpu.weights + FULL * PER_TOKEN
    group[1].budget.after_success(FULL)
    group[0].budget.after_success(STARTUP_RECORD_TOKENS)
    group[1].budget.take_largest_batch()  # (its last look took the full batch, not the peak)
    _first_look_of_a_run(group)
    assert memory.bytes_per_token == PER_TOKEN
    assert [r.budget.tokens() for r in group] == before


def test_within_a_run_peaks_still_raise_bytes_per_token(gpu):
    group = _group(gpu, 2, PER_TOKEN, estimate=PER_TOKEN, max_tokens=1 << 20)
    memory = group[0].memory
    _first_look_of_a_run(group)
    group[0].budget.after_success(20_000)
    group[1].budget.after_success(20_000)
    gpu.peak = gpu.weights + 40_000 * 2 * PER_TOKEN  # activations take twice the figure
    memory.refresh()
    assert memory.bytes_per_token == 2 * PER_TOKEN


class _HeldRunner:
    """A device whose batches finish only when the test lets them."""

    cuda = False
    padded = False
    device = torch.device("cpu")

    def __init__(self):
        self.release = threading.Event()
        self.launched = threading.Event()

    def stage(self, items):
        return items

    def launch(self, items):
        return items

    def finish(self, items):
        from gpuengine.runner import EmbeddedBatch

        self.launched.set()  # the worker waits for the batch it launched
        self.release.wait(10)
        n = len(items)
        return EmbeddedBatch({}, np.ones(n, bool), sum(i.n_tokens for i in items), 0.0)


def test_a_batch_in_flight_counts_as_the_replicas_largest_batch():
    """The allocator's peak holds a batch from its launch: so does the telemetry's
    denominator (else a look while big batches run and only a small one finished divides
    their peak by the small one)."""
    from gpuengine.budget import TokenBudget
    from gpuengine.packing import WorkItem
    from gpuengine.scheduler import Scheduler
    from gpuengine.worker import DeviceWorker

    scheduler = Scheduler()
    scheduler.submit([WorkItem(bytes([i]) * 16, np.zeros(500, np.int32), 498)
                      for i in range(4)])
    scheduler.close()
    runner, budget, halt = _HeldRunner(), TokenBudget(1 << 20, 1 << 20), threading.Event()
    worker = DeviceWorker(0, runner, budget, scheduler, queue.Queue(), halt)
    worker.start()
    try:
        assert runner.launched.wait(10)
        assert budget.take_largest_batch() == 2000  # in flight, not finished
    finally:
        halt.set()  # nobody completes the batch here: the worker stops after it
        runner.release.set()
        worker.join(10)
    assert not worker.is_alive()
