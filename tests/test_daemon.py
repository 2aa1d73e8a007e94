"""``gpuengine serve`` (the watch-directory daemon).

The attempt book and the failure rules (a fake run in place of the engine) are tested in
process. The daemon itself runs as a real process on the CPU with the tiny random-weight ESM-2
(``tiny_pt``), talking to the test through its status file, its folders and an AF_UNIX notify
socket (as systemd would):

* one daemon takes files dropped by rename, by marker and by a slow in-place writer, sends
  bad files (invalid letter, truncated gzip) to failed/ with an error record and keeps going,
  finishes a duplicate without recomputing, reports a fresh status and drains on SIGTERM;
* SIGTERM, and separately SIGKILL, in the middle of a big file, then a restart: the file is
  finished and every sequence is in the store exactly once;
* ``--job predict`` writes VirNucPro's outputs per file and reuses the embeddings.

How files arrive and when they are ready: test_daemon_inbox.py; the status file,
``gpuengine status`` and sd_notify: test_daemon_status.py.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_runs import cli
from conftest import rename_without_evidence
from gpuengine.config import EmbedConfig
from gpuengine.daemon import (AttemptBook, Daemon, DaemonExit, ServeConfig, atomic_write_json,
                              file_sha256)
from gpuengine.errors import DeviceError, GpuEngineError
from serve_processes import Served, child_env, fasta_bytes, store_counts, store_ids

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- attempt book


def test_attempt_book_persists_and_restarts_for_new_content(tmp_path):
    path = tmp_path / "attempts.json"
    book = AttemptBook(path)
    assert book.begin("x.fa", "s1") == 1
    assert book.begin("x.fa", "s1") == 2
    book.undo("x.fa")  # a drained attempt is not counted
    book.error("x.fa", RuntimeError("boom"))
    again = AttemptBook(path)
    assert again.get("x.fa")["attempts"] == 1
    assert again.get("x.fa")["errors"][0]["message"] == "boom"
    assert again.begin("x.fa", "s2") == 1  # another file under the same name
    again.clear("x.fa")
    assert AttemptBook(path).get("x.fa")["attempts"] == 0
    path.write_text("{not json")
    assert AttemptBook(path).files == {}


# ----------------------------------------------------------------------------- failure rules


class FakeRuns:
    """Stands in for run_embed: raises, is interrupted, or succeeds (counting calls)."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls = 0

    def __call__(self, config, progress, stop, replicas=None, completion_records=None):
        from gpuengine.engine import RunSummary

        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome == "stop-while-validating":  # what run_embed does then
            stop.set()
            raise KeyboardInterrupt
        failed = [("long1", "does not fit in device memory alone (9000 tokens)")]
        return RunSummary(str(config.out), "default", "fake", True, records_read=2,
                          valid_records=2, embedded=1, committed_records=1,
                          interrupted=outcome == "interrupted",
                          failed=failed if outcome == "partial" else [])


def fake_daemon(tmp_path, runs, max_attempts=3) -> Daemon:
    embed = EmbedConfig(inputs=(tmp_path / "w" / "inbox",), model="unused",
                        out=tmp_path / "store.lmdb")
    config = ServeConfig(watch=tmp_path / "w", embed=embed, max_attempts=max_attempts,
                         retry_delay=0)
    daemon = Daemon(config, run=runs, notify=lambda message: None)
    daemon.prepare()
    daemon.identity = {"test": True}
    return daemon


def drop_processing(daemon: Daemon, name: str, text: str = ">a\nMKV\n") -> None:
    (daemon.processing / name).write_text(text)


def test_other_errors_are_retried_then_failed_with_every_error(tmp_path):
    runs = FakeRuns(RuntimeError("one"), RuntimeError("two"), RuntimeError("three"))
    daemon = fake_daemon(tmp_path, runs)
    try:
        drop_processing(daemon, "x.fa")
        for attempt in (1, 2):
            daemon.process("x.fa")
            assert "x.fa" in daemon.retry_at and (daemon.processing / "x.fa").exists()
            assert daemon.attempts.get("x.fa")["attempts"] == attempt
        daemon.process("x.fa")
        assert (daemon.failed / "x.fa").exists() and not (daemon.processing / "x.fa").exists()
        record = json.loads((daemon.failed / "x.fa.error.json").read_text())
        assert record["kind"] == "error" and record["attempts"] == 3
        assert [e["message"] for e in record["errors"]] == ["one", "two", "three"]
        assert "RuntimeError: three" in record["traceback"]
        assert daemon.attempts.get("x.fa")["attempts"] == 0
    finally:
        daemon._unlock()


def test_drained_attempts_are_not_counted_and_device_errors_exit(tmp_path):
    runs = FakeRuns("interrupted", "stop-while-validating", DeviceError("cuda:0 died"))
    daemon = fake_daemon(tmp_path, runs)
    try:
        drop_processing(daemon, "x.fa")
        daemon.process("x.fa")
        assert (daemon.processing / "x.fa").exists()
        assert daemon.attempts.get("x.fa")["attempts"] == 0
        daemon.process("x.fa")  # a stop request during validation: KeyboardInterrupt
        assert runs.calls == 2 and (daemon.processing / "x.fa").exists()
        assert daemon.attempts.get("x.fa")["attempts"] == 0
        daemon.process("x.fa")  # a stop request before the run: not even started
        assert runs.calls == 2 and daemon.attempts.get("x.fa")["attempts"] == 0
        daemon.stop.clear()
        with pytest.raises(DaemonExit) as caught:
            daemon.process("x.fa")
        assert caught.value.code == 1 and (daemon.processing / "x.fa").exists()
        assert daemon.attempts.get("x.fa")["attempts"] == 1  # counted across the restart
    finally:
        daemon._unlock()


def test_a_file_that_killed_the_daemon_too_often_fails_without_a_run(tmp_path):
    runs = FakeRuns()
    daemon = fake_daemon(tmp_path, runs)
    drop_processing(daemon, "x.fa")
    sha = file_sha256(daemon.processing / "x.fa")
    daemon._unlock()
    atomic_write_json(tmp_path / "w" / "attempts.json", {"files": {"x.fa": {
        "sha256": sha, "attempts": 3, "errors": []}}})
    daemon = fake_daemon(tmp_path, runs)  # the restart after the third death
    try:
        daemon.process("x.fa")
        assert runs.calls == 0
        record = json.loads((daemon.failed / "x.fa.error.json").read_text())
        assert "gave up after 3 attempts" in record["reason"]
    finally:
        daemon._unlock()


def test_job_record_then_duplicate_and_recovery_without_a_run(tmp_path):
    runs = FakeRuns("ok")
    daemon = fake_daemon(tmp_path, runs)
    try:
        drop_processing(daemon, "a.fa")
        daemon.process("a.fa")
        job = json.loads((daemon.done / "a.fa.job.json").read_text())
        assert job["status"] == "complete" and job["counts"]["embedded"] == 1
        assert runs.calls == 1
        drop_processing(daemon, "b.fa")  # same content, another name
        daemon.process("b.fa")
        reused = json.loads((daemon.done / "b.fa.job.json").read_text())
        assert reused["reused"] is True and reused["first_file"] == "a.fa"
        drop_processing(daemon, "a.fa")  # a crash after the job record, before the move
        daemon.process("a.fa")
        assert (daemon.done / "a~2.fa").exists()
        assert json.loads((daemon.done / "a~2.fa.job.json").read_text())["job"] == job["job"]
        assert runs.calls == 1
    finally:
        daemon._unlock()


def test_sequences_that_fail_alone_leave_a_partial_job_in_done(tmp_path):
    daemon = fake_daemon(tmp_path, FakeRuns("partial"))
    try:
        drop_processing(daemon, "x.fa", ">ok\nMKV\n>long1\nMKVL\n")
        daemon.process("x.fa")
        job = json.loads((daemon.done / "x.fa.job.json").read_text())
        assert job["status"] == "partial" and job["exit_code"] == 3
        assert job["failed"] == [{"id": "long1", "reason": "does not fit in device memory "
                                                          "alone (9000 tokens)"}]
        from gpuengine.store.writer import StoreWriter

        with StoreWriter(tmp_path / "store.lmdb") as writer:
            assert writer.run_record(job["job"])["status"] == "partial"
    finally:
        daemon._unlock()


def test_one_daemon_per_directory(tmp_path):
    first = fake_daemon(tmp_path, FakeRuns())
    try:
        with pytest.raises(GpuEngineError, match="another gpuengine serve"):
            fake_daemon(tmp_path, FakeRuns())
        second = Daemon(first.config, run=FakeRuns(), notify=lambda message: None)
        status = tmp_path / "w" / "status.json"
        atomic_write_json(status, {"state": "ready", "pid": os.getpid()})
        assert second.run() == 1  # refused, and the first daemon's status is left alone
        assert json.loads(status.read_text()) == {"state": "ready", "pid": os.getpid()}
    finally:
        first._unlock()


# ----------------------------------------------------------------------------- real processes


@pytest.mark.slow
def test_daemon_takes_complete_files_and_survives_bad_ones(tiny_pt, tmp_path):
    served = Served(tmp_path, tiny_pt)
    try:
        served.wait_for_message("READY=1")
        status = json.loads((served.dir / "status.json").read_text())
        assert status["state"] == "ready" and status["pid"] == served.proc.pid
        done, failed = served.dir / "done", served.dir / "failed"

        # 1. renamed into inbox/
        a, a_ids, _ = fasta_bytes("a", 40, seed=1)
        served.drop("a.fa", a)
        served.wait_for(lambda: served.in_done("a.fa"), "a.fa in done/")
        job = served.job("a.fa")
        assert job["status"] == "complete" and job["counts"]["committed_records"] == 40
        assert job["sha256"] == file_sha256(done / "a.fa") and job["engine_run"]

        # 2. written in place, then a marker
        b, _, _ = fasta_bytes("b", 10, seed=2)
        (served.dir / "inbox" / "b.fa").write_bytes(b)
        (served.dir / "inbox" / "b.fa.done").touch()
        served.wait_for(lambda: served.in_done("b.fa"), "b.fa in done/")
        assert not (served.dir / "inbox" / "b.fa.done").exists()  # the marker is consumed

        # 3. bad input: an invalid letter, a truncated gzip -> failed/, the daemon goes on
        bad = b">ok1\nMKV\n>broken here\nMKVL\nMK1L\n"
        served.drop("bad.fa", bad)
        c, _, _ = fasta_bytes("c", 300, seed=3)
        served.drop("trunc.fa.gz", gzip.compress(c)[:-40])
        served.wait_for(lambda: served.in_failed("trunc.fa.gz") and served.in_failed("bad.fa"),
                        "bad files in failed/")
        error = json.loads((failed / "bad.fa.error.json").read_text())
        assert error["file"] == "bad.fa" and error["record"] == "broken"
        assert error["position"] == {"line": 5, "column": 3} and error["kind"] == "input"
        assert error["attempts"] == 1 and (failed / "bad.fa").read_bytes() == bad
        error = json.loads((failed / "trunc.fa.gz.error.json").read_text())
        assert "truncated or corrupt gzip" in error["reason"] and error["position"]["line"]

        # 4. a slow writer in place (no rename, no marker): pieces every 0.2 s for ~1.2 s,
        #    each ending with a newline; taken only once it has stopped for --settle (1 s)
        d, d_ids, _ = fasta_bytes("d", 60, seed=4)
        lines = d.splitlines(keepends=True)
        step = -(-len(lines) // 6)
        pieces = [b"".join(lines[i:i + step]) for i in range(0, len(lines), step)]
        slow = served.dir / "inbox" / "slow.fa"
        with open(slow, "wb") as fh:
            for piece in pieces:
                fh.write(piece)
                fh.flush()
                time.sleep(0.2)
        served.wait_for(lambda: served.in_done("slow.fa"), "slow.fa in done/")
        job = served.job("slow.fa")
        assert job["counts"]["records_read"] == 60 and (done / "slow.fa").read_bytes() == d

        # 5. a duplicate under another name: done, nothing recomputed
        before = store_counts(served.store)
        served.drop("a-copy.fa", a)
        served.wait_for(lambda: served.in_done("a-copy.fa"), "a-copy.fa in done/")
        assert served.job("a-copy.fa")["reused"] is True
        assert store_counts(served.store) == before  # no record, embedding or run added

        # 6. still alive, and healthy by `gpuengine status`
        assert served.proc.poll() is None
        served.wait_for(lambda: served.status()["files_done"] == 4, "4 files done in status")
        check = subprocess.run([sys.executable, "-m", "gpuengine", "status", str(served.dir)],
                               capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert check.returncode == 0, check.stderr
        assert "2 failed" in check.stdout and "4 done" in check.stdout
        status = served.status()
        assert status["files_done"] == 4 and status["files_failed"] == 2
        assert status["last_error"]["file"] in ("bad.fa", "trunc.fa.gz")
        assert set(store_ids(served.store)) == set(a_ids) | set(d_ids) | {
            f"b{i:05d}" for i in range(10)}

        # 7. SIGTERM when idle: exit 0, STOPPING=1, status "stopped"
        assert served.stop() == 0
        served.wait_for_message("STOPPING=1", timeout=5)
        status = json.loads((served.dir / "status.json").read_text())
        assert status["state"] == "stopped" and status["exit_code"] == 0
        assert cli("status", served.dir).exit_code == 1
    finally:
        served.close()


@pytest.mark.slow
def test_files_that_never_look_complete_are_taken_after_the_quiet_period(tiny_pt, tmp_path):
    """Nothing waits in inbox/ forever: a valid FASTA without a final newline goes to done/,
    binary junk to failed/ with its error record, each delivered in place and by a rename
    that shows no rename evidence (both fall to the completeness heuristic first)."""
    served = Served(tmp_path, tiny_pt, "--quiet-period", "3")
    try:
        served.wait_for_message("READY=1")
        inbox, staging = served.dir / "inbox", served.dir / "staging"
        staging.mkdir()
        fasta = {name: f">{name[0]}1 x\nMKVLA\n>{name[0]}2\nACDEFGHIK".encode()
                 for name in ("p.fa", "r.fa")}  # no final newline
        junk = {name: bytes(range(256)) * 4 for name in ("pj.bin", "rj.bin")}
        for name, data in {**fasta, **junk}.items():
            if name.startswith("p"):
                (inbox / name).write_bytes(data)
            else:
                (staging / name).write_bytes(data)
                rename_without_evidence(staging / name, inbox / name)
        seen_waiting: set[str] = set()

        def finished() -> bool:
            try:
                seen_waiting.update(served.status().get("waiting") or ())
            except (OSError, ValueError):
                pass
            return all(served.in_done(n) for n in fasta) and all(served.in_failed(n)
                                                                 for n in junk)

        served.wait_for(finished, "every file in done/ or failed/")
        assert seen_waiting == set(fasta) | set(junk)  # none had rename evidence or a newline
        for name, data in fasta.items():
            job = served.job(name)
            assert job["status"] == "complete" and job["counts"]["committed_records"] == 2
            assert (served.dir / "done" / name).read_bytes() == data
        for name, data in junk.items():
            error = json.loads((served.dir / "failed" / f"{name}.error.json").read_text())
            assert error["kind"] == "input" and "not valid UTF-8" in error["reason"]
            assert (served.dir / "failed" / name).read_bytes() == data
        assert sorted(store_ids(served.store)) == ["p1", "p2", "r1", "r2"]
        assert not list(inbox.iterdir())
        served.wait_for(lambda: served.status()["waiting"] == [], "no file listed as waiting")
        assert served.stderr().count(": taking it as it is") == 4
        assert served.stop() == 0
    finally:
        served.close()


@pytest.mark.slow
def test_daemon_refuses_a_table_computed_in_another_precision(tiny_pt, tmp_path):
    """The store's table was computed in fp32; a daemon asked for bf16 refuses to start
    (exit 1, before claiming anything) instead of mixing two precisions in one table."""
    fasta = tmp_path / "a.fa"
    fasta.write_bytes(fasta_bytes("a", 5, seed=1)[0])
    store = tmp_path / "store.lmdb"
    result = cli("embed", fasta, "--model", tiny_pt, "--out", store, "--gpus", "cpu", "-q")
    assert result.exit_code == 0, result.output
    served = Served(tmp_path, tiny_pt, "--precision", "bf16")
    try:
        assert served.proc.wait(timeout=120) == 1
        err = served.stderr()
        assert "table 'default' holds" in err and "compute precision differs (store: fp32, " \
            "run: bf16)" in err and "pass --precision fp32" in err and "--table NAME" in err
        assert "Traceback" not in err and not any("READY=1" in m for m in served.messages)
        assert store_counts(store) == (5, 5, 1)
    finally:
        served.close()


N_BIG = 6000  # several commit groups (one per 0.5 s) even on a fast machine: the kill lands mid-file


@pytest.fixture(scope="module")
def big_file():
    lengths = [20 + (i * 37) % 131 for i in range(N_BIG)]
    data, ids, seqs = fasta_bytes("big", N_BIG, seed=17, lengths=lengths)
    return data, ids, seqs


def stored_now(store: Path) -> int:
    from gpuengine.errors import StoreError

    if not (store / "data.mdb").exists():
        return 0
    try:
        return len(store_ids(store))
    except (StoreError, KeyError, ValueError):
        return 0


def interrupt_then_finish(tiny_pt, tmp_path, big_file, sig: int) -> dict:
    data, ids, seqs = big_file
    first = Served(tmp_path, tiny_pt, "--max-tokens", "256", log="first", held=True)
    try:
        first.wait_for_message("READY=1")
        first.drop("big.fa", data)
        first.wait_for(lambda: stored_now(first.store) > 0, "a first commit")
        code = first.stop(sig)
    finally:
        first.close()
    assert (first.dir / "processing" / "big.fa").exists(), first.stderr()
    stored = stored_now(first.store)
    assert 0 < stored < N_BIG, f"{stored} of {N_BIG} stored at the interruption"
    attempts = json.loads((first.dir / "attempts.json").read_text())["files"]["big.fa"]
    second = Served(tmp_path, tiny_pt, "--max-tokens", "256", log="second")
    try:
        second.wait_for(lambda: second.in_done("big.fa"), "big.fa finished after the restart",
                        timeout=120)
        assert second.stop() == 0
    finally:
        second.close()
    job = second.job("big.fa")
    assert job["status"] == "complete"
    assert job["counts"]["already_stored"] == stored
    assert job["counts"]["committed_records"] == N_BIG - stored
    assert job["engine_run"]["committed_records"] == N_BIG  # every record committed once
    assert job["engine_run"]["resumes"] == 1
    assert sorted(store_ids(second.store)) == ids
    records, embeddings, _ = store_counts(second.store)
    assert records == N_BIG and embeddings == len(set(seqs))
    return {"code": code, "attempts": attempts, "job": job}


@pytest.mark.slow
def test_sigterm_mid_file_drains_then_restart_finishes_it(tiny_pt, tmp_path, big_file):
    result = interrupt_then_finish(tiny_pt, tmp_path, big_file, signal.SIGTERM)
    assert result["code"] == 0
    assert result["attempts"]["attempts"] == 0  # a drained attempt is not counted
    assert result["job"]["attempts"] == 1


@pytest.mark.slow
def test_sigkill_mid_file_then_restart_finishes_it(tiny_pt, tmp_path, big_file):
    result = interrupt_then_finish(tiny_pt, tmp_path, big_file, signal.SIGKILL)
    assert result["code"] == -signal.SIGKILL
    assert result["attempts"]["attempts"] == 1  # the killed attempt counts
    assert result["job"]["attempts"] == 2


# -- --job predict ------------------------------------------------------------------------------

@pytest.mark.slow
def test_predict_job_writes_outputs_per_file_and_reuses_embeddings(tmp_path, predict_models):
    """`serve --job predict`: each reads file gets VirNucPro outputs in predictions/<file>-<sha>/
    equal to a plain `gpuengine predict` of it; a second file repeating the reads computes
    nothing (the embeddings are in the daemon's store)."""
    import numpy as np
    from virnucpro_files import read_predictions, reads_fasta

    esm, dna, _, mlp_path = predict_models
    reads_fasta(tmp_path / "reads.fa", n=30, seed=5)
    data = (tmp_path / "reads.fa").read_bytes()
    options = ["--job", "predict", "--length", "500", "--classifier", str(mlp_path),
               "--esm-model", str(esm), "--dnabert-model", str(dna), "--gpus", "cpu"]
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "gpuengine", "predict", str(tmp_path / "reads.fa"),
                    *options[2:], "--out", str(reference), "-q", "--offline"], check=True,
                   cwd=ROOT, env=child_env(tmp_path, ""), capture_output=True)
    served = Served(tmp_path, esm, *options)
    try:
        served.wait_for_message("READY=1")
        served.drop("run1.fa", data)
        served.wait_for(lambda: served.in_done("run1.fa"), "run1.fa predicted", timeout=90)
        served.drop("run2.fa", data)
        served.wait_for(lambda: served.in_done("run2.fa"), "run2.fa predicted", timeout=90)
        assert served.stop() == 0
    finally:
        served.close()
    first, second = served.job("run1.fa"), served.job("run2.fa")
    assert first["kind"] == "predict" and first["counts"]["embedded"] > 0
    out = served.dir / first["outputs"]
    ids, labels, scores = read_predictions(out / "prediction_results.txt")
    ref_ids, ref_labels, ref_scores = read_predictions(reference / "prediction_results.txt")
    assert ids == ref_ids and labels == ref_labels and np.abs(scores - ref_scores).max() <= 1e-6
    assert (out / "prediction_results_highestscore.csv").read_text() == \
        (reference / "prediction_results_highestscore.csv").read_text()
    # identical content: the finished job is reused, nothing is computed again
    assert second.get("reused") or second["counts"]["embedded"] == 0
