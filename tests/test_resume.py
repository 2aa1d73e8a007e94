"""Resuming: a real ``gpuengine embed`` process killed with SIGKILL, or stopped with SIGINT,
in the middle of a run leaves a consistent store, and rerunning the same command finishes it
without embedding anything twice.

The input is 3000 short proteins (every tenth id repeats an earlier sequence) embedded with
``--max-tokens 256`` (about a thousand batches). The engine commits a group every 0.5 s or
2048 sequences (``EmbedConfig.commit_every``; the CLI does not expose it), so a run on a CPU
makes several transactions and the first one can never hold every record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import isolated_cache, random_proteins, write_fasta
from test_cli import embed

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
N = 3000
TOL = 1e-6


@pytest.fixture(scope="module")
def workload(tiny_pt, tmp_path_factory):
    """The input, and every id's vector from one uninterrupted (in-process) run."""
    from gpuengine import EmbeddingStore

    base = tmp_path_factory.mktemp("resume")
    lengths = [20 + (i * 37) % 131 for i in range(N)]
    seqs = random_proteins(lengths, seed=17)
    for i in range(10, N, 10):
        seqs[i] = seqs[i - 5]  # identical sequences under other ids, across batches
    ids = [f"prot{i:05d}" for i in range(N)]
    fasta = write_fasta(base / "proteins.fa", list(zip(ids, seqs)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see child_env
    try:
        with isolated_cache(base / "cache"):
            summary = embed(fasta, tiny_pt, base / "reference.lmdb", "--max-tokens", "256", "-q")
    finally:
        torch.set_num_threads(threads)
    assert summary["committed_records"] == N
    assert summary["embedded"] == len(set(seqs)) and summary["deduplicated"] == N - len(set(seqs))
    with EmbeddingStore(base / "reference.lmdb") as store:
        vectors = dict(store.items())
    assert sorted(vectors) == ids
    return {"fasta": fasta, "ids": ids, "vectors": vectors}


def child_env() -> dict[str, str]:
    """The test's environment (offline, isolated cache) with one CPU thread: several torch
    processes on a small machine, each spinning a thread per core, slow down 30-fold."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def command(fasta: Path, model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "gpuengine", "embed", str(fasta), "--model", str(model),
            "--out", str(out), "--max-tokens", "256", "--json", "-q"]


def start(cmd: list[str], logs: Path) -> tuple[subprocess.Popen, Path, Path]:
    stdout, stderr = logs.with_suffix(".out"), logs.with_suffix(".err")
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=child_env())
    return proc, stdout, stderr


def committed(out: Path) -> int:
    """Record ids in the store now (0 while it does not exist or holds no table yet)."""
    from gpuengine import EmbeddingStore
    from gpuengine.errors import StoreError

    if not (out / "data.mdb").exists():
        return 0
    try:
        with EmbeddingStore(out) as store:
            return len(store)
    except StoreError:
        return 0


def wait_for_first_commit(proc: subprocess.Popen, out: Path, stderr: Path) -> int:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        n = committed(out)
        if n:
            return n
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before a commit was seen:\n"
                        f"{stderr.read_text()}")
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    pytest.fail("no commit within 180 s")


def check_store(out: Path, workload) -> list[str]:
    """Every stored id is an input id whose vector equals the uninterrupted run's."""
    from gpuengine import EmbeddingStore

    with EmbeddingStore(out) as store:
        ids = list(store)
        assert len(ids) == len(set(ids)) == len(store)
        assert set(ids) <= set(workload["ids"])
        worst = 0.0
        for rid, vector in store.items():
            worst = max(worst, float(np.abs(vector - workload["vectors"][rid]).max()))
        assert worst <= TOL, f"stored vectors differ from the uninterrupted run by {worst:.3g}"
    return ids


def rerun_to_completion(cmd: list[str], out: Path, stored_before: int, workload) -> dict:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=child_env())
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["already_stored"] == stored_before > 0
    assert summary["committed_records"] == N - stored_before
    assert summary["records_read"] == N and summary["exit_code"] == 0
    ids = check_store(out, workload)
    assert sorted(ids) == workload["ids"]  # every id exactly once
    return summary


def run_records(out: Path) -> list[dict]:
    from gpuengine import EmbeddingStore

    with EmbeddingStore(out) as store:
        return list(store.runs().values())


def test_sigkill_mid_run_then_rerun(tiny_pt, tmp_path, workload):
    out = tmp_path / "store.lmdb"
    cmd = command(workload["fasta"], tiny_pt, out)
    proc, _, stderr = start(cmd, tmp_path / "killed")
    try:
        wait_for_first_commit(proc, out, stderr)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    ids = check_store(out, workload)
    stored = len(ids)
    print(f"{stored} of {N} records stored at the kill")
    assert 0 < stored < N, f"{stored} of {N} records stored at the kill"
    [run] = run_records(out)
    assert run["status"] == "running" and run["committed_records"] == stored

    summary = rerun_to_completion(cmd, out, stored, workload)
    assert summary["embedded"] + summary["deduplicated"] == N - stored
    [run] = run_records(out)  # the same run, resumed
    assert run["status"] == "complete" and run["resumes"] == 1
    assert run["committed_records"] == N


def interrupt(cmd: list[str], out: Path, logs: Path, signals: list[int],
              codes: tuple[int, ...] = (130,)) -> subprocess.Popen:
    """Start ``cmd``, wait for its first commit, send ``signals`` (50 ms apart), wait for the
    end, whose exit code must be one of ``codes``."""
    proc, _, stderr = start(cmd, logs)
    try:
        wait_for_first_commit(proc, out, stderr)
        for k, sig in enumerate(signals):
            if k:
                time.sleep(0.05)
            if proc.poll() is None:
                proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in codes, stderr.read_text()
    return proc


def test_sigint_mid_run_exits_130_then_rerun(tiny_pt, tmp_path, workload):
    out = tmp_path / "store.lmdb"
    cmd = command(workload["fasta"], tiny_pt, out)
    interrupt(cmd, out, tmp_path / "interrupted", [signal.SIGINT])
    summary = json.loads((tmp_path / "interrupted.out").read_text())
    assert summary["interrupted"] is True and summary["exit_code"] == 130
    assert "stopping" in (tmp_path / "interrupted.err").read_text()

    ids = check_store(out, workload)
    stored = len(ids)
    print(f"{stored} of {N} records stored at the interruption")
    assert stored == summary["committed_records"] > 0
    [run] = run_records(out)
    assert run["status"] == "interrupted" and run["committed_records"] == stored

    if stored < N:
        rerun_to_completion(cmd, out, stored, workload)
        [run] = run_records(out)
        assert run["status"] == "complete" and run["committed_records"] == N


def test_sigterm_drains_like_ctrl_c(tiny_pt, tmp_path, workload):
    out = tmp_path / "store.lmdb"
    interrupt(command(workload["fasta"], tiny_pt, out), out, tmp_path / "term", [signal.SIGTERM])
    summary = json.loads((tmp_path / "term.out").read_text())
    assert summary["interrupted"] is True
    assert len(check_store(out, workload)) == summary["committed_records"] > 0
    [run] = run_records(out)
    assert run["status"] == "interrupted"


def test_second_ctrl_c_leaves_a_consistent_store(tiny_pt, tmp_path, workload):
    """A second Ctrl-C quits at once (os._exit(130)) unless the drain after the first one
    already ended; then it lands on the exiting interpreter, which dies of SIGINT (a shell
    shows that as 130 too). Either way the store holds only whole, correct records."""
    out = tmp_path / "store.lmdb"
    interrupt(command(workload["fasta"], tiny_pt, out), out, tmp_path / "twice",
              [signal.SIGINT, signal.SIGINT], codes=(130, -signal.SIGINT))
    printed = (tmp_path / "twice.out").read_text()
    if printed:  # the drain won the race: a complete, interrupted summary
        assert json.loads(printed)["interrupted"] is True
    assert 0 < len(check_store(out, workload)) <= N
