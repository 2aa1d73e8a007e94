"""A device worker that lingers inside torch after its last report, for the clean-exit tests
(test_clean_exit.py); importable by a child ``gpuengine`` process too (it imports no test
module and nothing of the test suite)."""

from __future__ import annotations

import time


def slow_worker_exit(seconds: float):
    """DeviceWorker._run that stays inside torch for ``seconds`` after its last report (what a
    worker descheduled while freeing its last batch's tensors looks like to the engine)."""
    import torch

    from gpuengine.worker import DeviceWorker

    real_run = DeviceWorker._run

    def run(self):
        real_run(self)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            torch.empty(8)
    return run
