"""The writer process inside real runs: the store a run writes through it holds the same bytes
as through the writer thread; which runs use it; every child joined on every path; kill -9 of
the engine or of the writer, SIGINT, and reruns that complete exactly once."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from conftest import random_proteins, write_fasta
from digest_runner import DigestRunner
from embed_processes import (N, check_store, command, committed, interrupt,
                             rerun_to_completion, run_records, start, wait_for_first_commit,
                             writer_child)
from gpuengine import engine as engine_module
from gpuengine.config import EmbedConfig
from gpuengine.engine import run_embed
from gpuengine.writer_process import CommitterProcess
from process_tree import children, wait_gone
from store_contents import mixed_records, store_contents

MAX_RESIDUES = 40


@pytest.fixture
def started(monkeypatch):
    """How many writer processes were started."""
    count = []
    real = CommitterProcess.start

    def spy(self):
        count.append(self)
        real(self)

    monkeypatch.setattr(CommitterProcess, "start", spy)
    return count


@pytest.mark.parametrize("input_process,store_dtype", [(True, "float16"), (False, "float32")])
def test_the_writer_process_stores_the_bytes_the_writer_thread_stores(
        tmp_path, tiny_pt, monkeypatch, started, input_process, store_dtype):
    monkeypatch.setenv("GPUENGINE_INPUT_PROCESSES", "2")
    monkeypatch.setenv("GPUENGINE_INPUT_BLOCK_BYTES", "3000")
    first, more = mixed_records(240, seed=1), mixed_records(90, seed=2)
    stores = {}
    for choice in ("0", "1"):
        monkeypatch.setenv("GPUENGINE_WRITER_PROCESS", choice)
        out = tmp_path / f"w{choice}.lmdb"
        for records, name, every in ((first[:150], "a.fa", 50), (first + more, "b.fa", 7)):
            config = EmbedConfig(inputs=(write_fasta(tmp_path / name, records),),
                                 model=str(tiny_pt), out=out, pools=("mean", "bos"),
                                 max_residues=MAX_RESIDUES, store_dtype=store_dtype,
                                 max_tokens=256, commit_every=every,
                                 input_process=input_process)
            summary = run_embed(config, runner_factory=lambda d, p, o: DigestRunner(o, []))
        assert summary.already_stored == 150
        assert summary.committed_records == len(first) + len(more) - 150
        stores[choice] = store_contents(out)
        [run] = [r for r in run_records(out) if r["info"]["inputs"][0].endswith("b.fa")]
        assert run["status"] == "complete"
        assert run["committed_records"] == summary.committed_records
    assert len(started) == 2  # the two runs of the second store
    assert stores["0"].keys() == stores["1"].keys() and len(stores["0"]) == 2
    for name in stores["0"]:
        assert stores["1"][name] == stores["0"][name], name


def test_runs_of_the_input_process_size_use_the_writer_process(tmp_path, tiny_pt, monkeypatch,
                                                                started):
    monkeypatch.delenv("GPUENGINE_WRITER_PROCESS", raising=False)
    monkeypatch.setattr(engine_module, "INPUT_PROCESS_MIN_RECORDS", 100)
    seqs = random_proteins([10 + i % 30 for i in range(150)], seed=4)
    for n in (99, 100):
        config = EmbedConfig(inputs=(write_fasta(tmp_path / f"{n}.fa", list(zip(
            [f"p{i}" for i in range(n)], seqs))),), model=str(tiny_pt),
            out=tmp_path / f"{n}.lmdb", max_tokens=256)
        summary = run_embed(config, runner_factory=lambda d, p, o: DigestRunner(o, []))
        assert summary.committed_records == n
        assert len(started) == (n == 100)


def _child_pids() -> set[int]:
    return set(children(os.getpid()))


@pytest.mark.parametrize("path", ["complete", "interrupted", "device error"])
def test_no_thread_or_child_outlives_a_run_with_the_writer_process(tmp_path, tiny_pt,
                                                                   monkeypatch, started, path):
    from gpuengine import runner as runner_module
    from gpuengine.errors import DeviceError

    monkeypatch.setenv("GPUENGINE_WRITER_PROCESS", "1")
    seqs = random_proteins([10 + (i * 11) % 60 for i in range(40)], seed=9)
    fasta = write_fasta(tmp_path / "p.fa", [(f"p{i}", s) for i, s in enumerate(seqs)])
    threads, kids = set(threading.enumerate()), _child_pids()
    stop = threading.Event()
    if path == "interrupted":  # stopped as the first group goes to the writer: the loop
        real = CommitterProcess.put  # sees the stop before it can see the end of the input

        def put(self, *args, **kwargs):
            real(self, *args, **kwargs)
            stop.set()

        monkeypatch.setattr(CommitterProcess, "put", put)
    if path == "device error":
        launches = iter(range(1_000_000))
        real_launch = runner_module.Runner.launch

        def launch(self, staged):
            if next(launches) == 3:
                raise RuntimeError("a device error on the fourth batch")
            return real_launch(self, staged)

        monkeypatch.setattr(runner_module.Runner, "launch", launch)
    config = EmbedConfig(inputs=(fasta,), model=str(tiny_pt), out=tmp_path / "s.lmdb",
                         max_tokens=96, commit_every=4, input_process=True)
    if path == "device error":
        with pytest.raises(DeviceError, match="fourth batch"):
            run_embed(config, None, stop)
    else:
        summary = run_embed(config, None, stop)
        assert summary.interrupted == (path == "interrupted")
    assert len(started) == 1 and started[0].proc.returncode == 0
    assert [t.name for t in threading.enumerate() if t not in threads and t.is_alive()] == []
    assert sorted(_child_pids() - kids) == []


@pytest.mark.slow
def test_kill_9_of_the_writer_stops_the_run_with_a_store_error_then_rerun(
        tiny_pt, tmp_path, resume_workload, monkeypatch):
    monkeypatch.setenv("GPUENGINE_WRITER_PROCESS", "1")
    out = tmp_path / "store.lmdb"
    cmd = command(resume_workload["fasta"], tiny_pt, out)
    proc, _, stderr = start(cmd, tmp_path / "killed")
    try:
        wait_for_first_commit(proc, out, stderr)
        os.kill(writer_child(proc.pid), signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = stderr.read_text()
    assert proc.returncode == 1, text
    assert "store writer process" in text and "killed by signal SIGKILL" in text, text
    assert "Traceback" not in text, text
    stored = len(check_store(out, resume_workload))
    assert 0 < stored < N
    rerun_to_completion(cmd, out, stored, resume_workload)


@pytest.mark.slow
def test_kill_9_of_the_engine_ends_its_writer_then_rerun(tiny_pt, tmp_path, resume_workload,
                                                         monkeypatch):
    monkeypatch.setenv("GPUENGINE_WRITER_PROCESS", "1")
    out = tmp_path / "store.lmdb"
    cmd = command(resume_workload["fasta"], tiny_pt, out)
    proc, _, stderr = start(cmd, tmp_path / "killed")
    try:
        wait_for_first_commit(proc, out, stderr)
        writer = writer_child(proc.pid)
        kids = children(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and writer in kids
    assert wait_gone(kids), "a child outlived the engine's kill -9"
    stored = len(check_store(out, resume_workload))
    assert 0 < stored < N
    [run] = run_records(out)
    assert run["status"] == "running" and run["committed_records"] == stored
    rerun_to_completion(cmd, out, stored, resume_workload)


@pytest.mark.slow
def test_sigint_commits_what_is_done_through_the_writer_process(tiny_pt, tmp_path,
                                                                 resume_workload, monkeypatch):
    monkeypatch.setenv("GPUENGINE_WRITER_PROCESS", "1")
    out = tmp_path / "store.lmdb"
    cmd = command(resume_workload["fasta"], tiny_pt, out)
    interrupt(cmd, out, tmp_path / "interrupted", [signal.SIGINT])
    summary = json.loads((tmp_path / "interrupted.out").read_text())
    assert summary["interrupted"] is True and summary["exit_code"] == 130
    stored = len(check_store(out, resume_workload))
    assert stored == summary["committed_records"] == committed(out) > 0
    [run] = run_records(out)
    assert run["status"] == "interrupted" and run["committed_records"] == stored
    if stored < N:
        rerun_to_completion(cmd, out, stored, resume_workload)
