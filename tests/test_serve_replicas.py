"""``gpuengine serve --replicas-per-gpu 2`` on the CPU (issue 16): a file read by input processes
(as tools/bench_serve.py's 200,000-protein file is) and then a group of small files, through
a real daemon process whose two replicas were built by its start-up run and are reused by
every run after it."""

from __future__ import annotations

import pytest

from serve_processes import Served, fasta_bytes, store_ids


@pytest.mark.slow
def test_serve_two_cpu_replicas_a_file_from_input_processes_then_a_group(tiny_pt, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("GPUENGINE_INPUT_PROCESS", "1")  # children even for 3000 records
    monkeypatch.setenv("GPUENGINE_INPUT_PROCESSES", "2")
    big, big_ids, _ = fasta_bytes("b", 3000, seed=21, lengths=[48 + i % 3 for i in range(3000)])
    small = [fasta_bytes(f"s{k}_", 20, seed=30 + k) for k in range(3)]
    served = Served(tmp_path, tiny_pt, "--gpus", "cpu", "--replicas-per-gpu", "2")
    try:
        served.wait_for_message("READY=1")
        served.drop("big.fa", big)
        served.wait_for(lambda: served.in_done("big.fa"), "big.fa in done/")
        for k, (data, _, _) in enumerate(small):
            served.drop(f"small{k}.fa", data)
        served.wait_for(lambda: all(served.in_done(f"small{k}.fa") for k in range(3)),
                        "the small files in done/")
        job = served.job("big.fa")
        assert served.stop() == 0
    finally:
        served.close()
    assert job["status"] == "complete" and job["counts"]["committed_records"] == 3000
    assert [d["device"] for d in job["devices"]] == ["cpu#0", "cpu#1"]
    assert sum(d["sequences"] for d in job["devices"]) == 3000
    expected = big_ids + [rid for _, ids, _ in small for rid in ids]
    assert sorted(store_ids(served.store)) == sorted(expected)
