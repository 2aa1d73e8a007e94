"""Issue 16 on a real GPU (``pytest -m gpu``): ``--replicas-per-gpu 2`` keeps its budgets from
one run to the next, and ``gpuengine serve`` with two replicas finishes a file large enough for
the input processes.

* The daemon's way (one replica pool; a one-record start-up run, then a file of 25,000
  proteins, read by the input processes), with the telemetry's first look of each run taken
  before any of its batches finished (the engine takes it a second in; the input processes
  may not have delivered by then): every replica still runs full-budget batches. Before the
  telemetry looked at the same span for the allocator's peak and the largest batches, this
  look divided the warm-up calibration's peak by the start-up run's 18-token batch and every
  budget fell to a few hundred tokens.
* A real ``gpuengine serve --gpus 0 --replicas-per-gpu 2`` process and one 25,000-protein
  file (read by the input processes, as the 200,000-protein file of tools/bench_serve.py is)
  is done, every id stored, both replicas used, within two minutes.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import random_proteins, write_fasta
from gpuengine.synthetic import write_fair_esm_checkpoint
from serve_processes import Served, fasta_bytes, store_ids

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_pt(tmp_path_factory):
    return write_fair_esm_checkpoint(tmp_path_factory.mktemp("w") / "esm2_t4_win.pt", 4, 128, 4,
                                     seed=7)


def test_a_runs_first_look_before_any_batch_keeps_full_budgets(gpu_pt, tmp_path, monkeypatch):
    import gpuengine.replicas as replicas
    from gpuengine.budget import DEFAULT_GPU_MAX_TOKENS
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed

    looks = []
    telemetry_run = replicas.MemoryTelemetry.run

    def look_at_once(self):  # the first look before any worker has finished a batch
        for memory in self.memories:
            memory.refresh()
            looks.append(memory.bytes_per_token)
        telemetry_run(self)

    monkeypatch.setattr(replicas.MemoryTelemetry, "run", look_at_once)
    pool = replicas.ReplicaPool()
    try:
        start = write_fasta(tmp_path / "start.fa", [("w", "MKTAYIAKQRQISFVKSHFSRQ")])
        config = EmbedConfig(inputs=(start,), model=str(gpu_pt), out=tmp_path / "start.lmdb",
                             devices="0", precision="fp16", replicas_per_gpu=2)
        run_embed(config, replicas=pool)
        calibrated = pool.memories()[0].bytes_per_token
        n = 25_000  # read by the input processes, as the daemon reads a large file
        seqs = random_proteins([48 + i % 3 for i in range(n)], seed=8)
        fasta = write_fasta(tmp_path / "in.fa", [(f"p{i}", s) for i, s in enumerate(seqs)])
        config = EmbedConfig(inputs=(fasta,), model=str(gpu_pt), out=tmp_path / "s.lmdb",
                             devices="0", precision="fp16", replicas_per_gpu=2)
        summary = run_embed(config, replicas=pool)
    finally:
        pool.clear()
    assert summary.embedded == n and not summary.failed
    assert len(looks) == 2 and looks[1] <= 4 * calibrated, (looks, calibrated)
    assert [d["budget_tokens"] for d in summary.devices] == [DEFAULT_GPU_MAX_TOKENS] * 2
    # 25,000 x 51 tokens: about 20 full batches, 25 of one input chunk (1,024 proteins) each;
    # with budgets of a few thousand tokens it took hundreds
    assert sum(d["batches"] for d in summary.devices) <= 80, summary.devices


def test_serve_with_two_replicas_finishes_a_file_read_by_the_input_processes(gpu_pt, tmp_path):
    n = 25_000  # at least INPUT_PROCESS_MIN_RECORDS: read by the input processes
    data, ids, _ = fasta_bytes("q", n, seed=9, lengths=[48 + i % 3 for i in range(n)])
    served = Served(tmp_path, gpu_pt, "--gpus", "0", "--replicas-per-gpu", "2",
                    "--precision", "fp16")
    try:
        served.wait_for_message("READY=1", timeout=180)
        started = time.monotonic()
        served.drop("big.fa", data)
        served.wait_for(lambda: served.in_done("big.fa"), "big.fa in done/", timeout=120)
        seconds = time.monotonic() - started
        job = served.job("big.fa")
        assert served.stop() == 0
    finally:
        served.close()
    assert job["status"] == "complete" and job["counts"]["committed_records"] == n
    devices = job["devices"]
    assert [d["device"] for d in devices] == ["cuda:0#0", "cuda:0#1"], json.dumps(devices)
    assert all(d["batches"] > 0 for d in devices), json.dumps(devices)
    assert all(d["budget_tokens"] >= 4096 for d in devices), json.dumps(devices)
    assert sorted(store_ids(served.store)) == sorted(ids)
    print(f"serve R=2: {n} proteins in {seconds:.1f} s")
