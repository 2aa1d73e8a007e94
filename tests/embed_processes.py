"""Real ``gpuengine embed`` processes, started, killed, interrupted and rerun to completion.

The workload (conftest's ``resume_workload``, made by :func:`make_workload`) is N = 3000 short
proteins (every tenth id repeats an earlier sequence) embedded with ``--max-tokens 256`` (about
a thousand batches), and every id's vector from one uninterrupted run. The engine commits a
group every 0.5 s or 2048 sequences, so a run on a CPU makes several transactions and the first
one never holds every record. A process :func:`start` starts is held (held_process.py) after
its first batches until the engine halts, so one signalled or killed after its first commit
is stopped mid-run however busy the machine is (a run left to itself could finish between
the poll that sees the commit and the signal).
``check_store`` says a store holds only input ids, each once, with the uninterrupted run's
vectors.
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

from cli_runs import embed
from conftest import isolated_cache, random_proteins, write_fasta
from gpuengine import EmbeddingStore
from gpuengine.errors import StoreError
from held_process import held_command, held_env
from process_tree import children

ROOT = Path(__file__).resolve().parents[1]
N = 3000
TOL = 1e-6
"""Stored vectors against the uninterrupted run's (the same model and batches' shapes)."""


def make_workload(model: Path, base: Path) -> dict:
    """The input (N proteins in ``base``), and every id's vector from one uninterrupted
    in-process run: {'fasta', 'ids', 'vectors'} (conftest's ``resume_workload``)."""
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
            summary = embed(fasta, model, base / "reference.lmdb", "--max-tokens", "256", "-q")
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
    """Start ``cmd`` (``python -m gpuengine …``) held: it commits its first batches and takes
    no more until a signal (or a failure) halts it (see held_process.py); its output goes
    to ``logs`` with the suffixes .out and .err."""
    assert cmd[1:3] == ["-m", "gpuengine"], cmd
    stdout, stderr = logs.with_suffix(".out"), logs.with_suffix(".err")
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen(held_command(*cmd[3:]), cwd=ROOT, stdout=out, stderr=err,
                                env=held_env(child_env()))
    return proc, stdout, stderr


def committed(out: Path) -> int:
    """Record ids in the store now (0 while it does not exist or holds no table yet)."""
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


def kill_after_first_commit(cmd: list[str], out: Path,
                            logs: Path) -> tuple[subprocess.Popen, list[int]]:
    """Start ``cmd``, send it SIGKILL once its first commit is seen and reap it; the process
    and the pids of the children it had just before the kill."""
    proc, _, stderr = start(cmd, logs)
    try:
        wait_for_first_commit(proc, out, stderr)
        kids = children(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return proc, kids


def check_store(out: Path, workload) -> list[str]:
    """Every stored id is an input id whose vector equals the uninterrupted run's."""
    with EmbeddingStore(out) as store:
        ids = list(store)
        assert len(ids) == len(set(ids)) == len(store)
        assert set(ids) <= set(workload["ids"])
        worst = 0.0
        for rid, vector in store.items():
            worst = max(worst, float(np.abs(vector - workload["vectors"][rid]).max()))
        assert worst <= TOL, f"stored vectors differ from the uninterrupted run by {worst:.3g}"
    assert_no_orphan_vectors(out)
    return ids


def assert_no_orphan_vectors(out: Path) -> None:
    """Every table's vectors are exactly those of the sequences its ids name, one per output,
    under the keys the table's spec gives (a vector under any other key is an orphan)."""
    import lmdb

    from gpuengine.store.writer import StoreWriter

    env = lmdb.open(str(out), readonly=True, lock=False, max_dbs=64)
    try:
        with env.begin() as txn:
            names = [bytes(k)[4:].decode() for k, _ in txn.cursor() if bytes(k).startswith(b"ids:")]
            found = {}
            for name in names:
                ids = env.open_db(f"ids:{name}".encode(), txn=txn, create=False)
                emb = env.open_db(f"emb:{name}".encode(), txn=txn, create=False)
                found[name] = ({bytes(v[:16]) for _, v in txn.cursor(db=ids)},
                               {bytes(k) for k, _ in txn.cursor(db=emb)})
    finally:
        env.close()
    with StoreWriter(out) as writer:
        for name, (sequences, keys) in found.items():
            spec = writer.stored_spec(name)
            wanted = {spec.embedding_key(o, d) for o in spec.outputs for d in sequences}
            assert keys == wanted, (f"table {name}: {len(keys - wanted)} vectors under keys no "
                                    f"id names, {len(wanted - keys)} missing")


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
    with EmbeddingStore(out) as store:
        return list(store.runs().values())


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


def committed_in_another_process(store: Path, table: str = "default") -> int:
    """Record ids in ``table`` of ``store``, read by a fresh process (0 while it does not
    exist): what a user's second shell would see while the run is still writing."""
    code = ("import sys\nfrom gpuengine import EmbeddingStore\ntry:\n"
            f"    s = EmbeddingStore({str(store)!r}, table={table!r}); print(len(s))\n"
            "except Exception:\n    print(0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return int(result.stdout.strip() or 0)


def writer_child(pid: int) -> int:
    """The pid of the store writer process (``python -m gpuengine.writer_process``) among
    ``pid``'s children; waits up to 30 s for it to appear."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for kid in children(pid):
            try:
                with open(f"/proc/{kid}/cmdline", "rb") as fh:
                    if b"gpuengine.writer_process" in fh.read():
                        return kid
            except OSError:
                continue
        time.sleep(0.02)
    pytest.fail(f"process {pid} started no store writer process")
