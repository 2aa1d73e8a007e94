"""A run's vectors written by N writer processes into N part stores (``embed --writers N``):
the partition (the shard rule), the layout, every reader path on the directory of parts, the
bytes after ``gpuengine merge`` against one writer, reruns keeping the recorded number, the
id-conflict refusal across parts, and kill -9 of the engine or of one part's writer with a
rerun that completes exactly once."""

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

from cli_runs import cli
from conftest import random_proteins, write_fasta
from digest_runner import DigestRunner
from embed_processes import (N, ROOT, assert_no_orphan_vectors, child_env, command, start)
from gpuengine import EmbeddingStore
from gpuengine.config import EmbedConfig
from gpuengine.engine import run_embed
from gpuengine.errors import StoreError, UsageError
from gpuengine.shards import shard_of
from gpuengine.store.codec import sequence_digest
from gpuengine.store.commit_group import CommitEntry, CommitRows
from gpuengine.store.merge import merge_stores
from gpuengine.store.parts import part_name, parts_of, recorded_parts
from gpuengine.store.schema import OutputSpec
from gpuengine.writer_parts import split_group
from process_tree import children, wait_gone
from store_contents import mixed_records, store_contents

MAX_RESIDUES = 40


def _parts(out: Path, count: int) -> list[Path]:
    paths = sorted(out.iterdir())
    assert [p.name for p in paths] == [part_name(i, count) for i in range(count)]
    return paths


def _check_partition(out: Path, count: int) -> int:
    """Every part holds only sequences of its part, no orphan vectors; returns the ids."""
    total = 0
    for index, part in enumerate(_parts(out, count)):
        contents = store_contents(part)
        digests = [v[:16] for v in contents["ids:default"].values()]
        assert set(parts_of(digests, count).tolist()) <= {index}
        assert_no_orphan_vectors(part)
        total += len(digests)
    return total


# ----------------------------------------------------------------------------- the split


def test_the_part_of_a_sequence_is_its_shard():
    digests = [sequence_digest(s) for s in random_proteins([5 + i % 40 for i in range(500)], 3)]
    for count in (1, 2, 3, 4, 7):
        assert parts_of(digests, count).tolist() == [shard_of(d, count) for d in digests]


def test_a_group_is_split_by_part_in_order_with_its_aliases():
    out = OutputSpec(6, "mean")
    seqs = random_proteins([8 + i for i in range(40)], seed=5)
    digests = [sequence_digest(s) for s in seqs]
    vectors = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    keys = ([bytes([i]) * 16 for i in range(40)],)
    rows = CommitRows(digests, [(f"id{i}",) for i in range(40)], {out: vectors}, keys)
    listed = CommitRows(digests[:10], [(f"x{i}", f"y{i}") for i in range(10)],
                        {out: list(vectors[:10])})
    alias = CommitEntry(digests[7], ("alias7",), None)
    shares = split_group([rows, listed, alias], 3)
    owners = parts_of(digests, 3).tolist()
    seen = []
    for index, share in enumerate(shares):
        for part in share:
            if type(part) is CommitEntry:
                assert owners[7] == index and part is alias
                continue
            for j, digest in enumerate(part.seq_digests):
                i = digests.index(digest)
                assert owners[i] == index
                assert np.array_equal(part.vectors[out][j], vectors[i])
                if part.embedding_keys:
                    assert part.embedding_keys[0][j] == keys[0][i]
                seen.append(part.record_ids[j])
        assert type(share[-1]) is CommitEntry or alias not in share  # the alias comes last
    assert sorted(seen) == sorted([(f"id{i}",) for i in range(40)]
                                  + [(f"x{i}", f"y{i}") for i in range(10)])


# ----------------------------------------------------------------------------- whole runs


def _embed(tmp_path, tiny_pt, out, records, name, writers, every=7):
    config = EmbedConfig(inputs=(write_fasta(tmp_path / name, records),), model=str(tiny_pt),
                         out=out, pools=("mean", "bos"), max_residues=MAX_RESIDUES,
                         max_tokens=256, commit_every=every, writers=writers)
    return run_embed(config, runner_factory=lambda d, p, o: DigestRunner(o, []))


def test_n_writers_then_merge_give_the_bytes_of_one_writer(tmp_path, tiny_pt, monkeypatch):
    monkeypatch.setenv("GPUENGINE_INPUT_PROCESSES", "2")
    first, more = mixed_records(240, seed=1), mixed_records(90, seed=2)
    single, parted = tmp_path / "one.lmdb", tmp_path / "three.lmdb"
    for out, writers in ((single, 1), (parted, 3)):
        _embed(tmp_path, tiny_pt, out, first[:150], "a.fa", writers, every=50)
        summary = _embed(tmp_path, tiny_pt, out, first + more, "b.fa", writers)
        assert summary.already_stored == 150
        assert summary.committed_records == len(first) + len(more) - 150
        assert summary.writers == writers  # the summary's share of commit time divides by it
    assert recorded_parts(single) == 1 and recorded_parts(parted) == 3
    assert _check_partition(parted, 3) == len(first) + len(more)
    for part in _parts(parted, 3):  # each part's run records count its own commits
        with EmbeddingStore(part) as store:
            runs = list(store.runs().values())
            assert {r["info"]["part"] for r in runs} == {f"{part.name[5:7].lstrip('0') or '0'}/3"}
            assert {r["status"] for r in runs} == {"complete"}
            assert sum(r["committed_records"] for r in runs) == len(store)
    with EmbeddingStore(single) as one, EmbeddingStore(parted) as three:
        assert len(three) == len(one)
        for (rid, v), (rid3, v3) in zip(one.items(), three.items()):
            assert rid == rid3 and np.array_equal(v, v3)
    merged = tmp_path / "merged.lmdb"
    merge_stores(merged, [parted], verify=True)
    want, got = store_contents(single), store_contents(merged)
    assert want.keys() == got.keys() and len(want) == 2
    for name in want:
        assert got[name] == want[name], name


def test_lookup_info_export_read_the_parts_as_one_store(tmp_path, tiny_pt):
    records = mixed_records(120, seed=3)
    out = tmp_path / "parts.lmdb"
    _embed(tmp_path, tiny_pt, out, records, "p.fa", 2)
    assert recorded_parts(out) == 2
    ids = [rid for rid, _ in records]
    looked = cli("lookup", out, ids[5], ids[77], "--json")
    assert looked.exit_code == 0, looked.stderr
    rows = [json.loads(line) for line in looked.stdout.splitlines()]
    with EmbeddingStore(out) as store:
        assert len(store) == len(ids)
        for row in rows:
            assert np.array_equal(np.asarray(row["embedding"], np.float32), store[row["id"]])
    assert [row["id"] for row in rows] == [ids[5], ids[77]]
    info = cli("info", out, "--json")
    assert info.exit_code == 0, info.stderr
    assert json.dumps(json.loads(info.stdout)).count("part-0") >= 2
    exported = tmp_path / "all.npz"
    result = cli("export", out, "--output", exported)
    assert result.exit_code == 0, result.stderr
    with np.load(exported) as npz:
        stored_ids = [str(x) for x in npz["ids"]]
    assert sorted(stored_ids) == sorted(ids)


def test_a_rerun_keeps_the_number_of_parts_its_store_holds(tmp_path, tiny_pt):
    records = mixed_records(90, seed=4)
    out = tmp_path / "parts.lmdb"
    _embed(tmp_path, tiny_pt, out, records[:40], "a.fa", 2)
    summary = _embed(tmp_path, tiny_pt, out, records, "b.fa", None)  # left open: the recorded 2
    assert summary.already_stored == 40 and recorded_parts(out) == 2
    assert _check_partition(out, 2) == 90
    with pytest.raises(UsageError, match="--writers 3: .* was written by 2 writers"):
        _embed(tmp_path, tiny_pt, out, records, "b.fa", 3)
    _embed(tmp_path, tiny_pt, tmp_path / "one.lmdb", records, "c.fa", 1)
    with pytest.raises(UsageError, match=r"--writers 2: .* was written by 1 writer \(one store"):
        _embed(tmp_path, tiny_pt, tmp_path / "one.lmdb", records, "c.fa", 2)
    fasta = write_fasta(tmp_path / "d.fa", records)
    refused = cli("embed", fasta, "--model", tiny_pt, "--out", out, "--writers", "4",
                  "--max-residues", MAX_RESIDUES)
    assert refused.exit_code == 2 and "was written by 2 writers" in refused.stderr
    assert "Traceback" not in refused.stderr
    (out / part_name(0, 3)).mkdir()
    with pytest.raises(StoreError, match="different numbers of writers"):
        recorded_parts(out)


def test_an_id_of_another_sequence_in_another_part_is_refused(tmp_path, tiny_pt):
    seqs = random_proteins([20 + i for i in range(60)], seed=8)
    owners = parts_of([sequence_digest(s) for s in seqs], 2).tolist()
    a = seqs[owners.index(0)]
    b = seqs[owners.index(1)]
    out = tmp_path / "parts.lmdb"
    _embed(tmp_path, tiny_pt, out, [("X", a), ("Y", b)], "a.fa", 2)
    before = [store_contents(p) for p in _parts(out, 2)]
    for records in ([("X", b)], [("Y", a)]):  # the id's new sequence is in the other part
        fasta = write_fasta(tmp_path / "conflict.fa", records)
        result = cli("embed", fasta, "--model", tiny_pt, "--out", out,
                     "--max-residues", MAX_RESIDUES)
        assert result.exit_code != 0 and "different sequence" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert [store_contents(p) for p in _parts(out, 2)] == before


def test_a_large_input_on_16_cores_gets_one_writer_unless_asked(tmp_path, tiny_pt, monkeypatch):
    """``embed`` without ``--writers`` writes one store (one file), whatever the input's size
    and the cores; ``--writers 2`` on the same input and cores writes two parts."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("GPUENGINE_INPUT_PROCESSES", "2")  # the VM's cores, not the 16 claimed
    distinct = random_proteins([10 + i % 30 for i in range(40)], seed=10)
    records = [(f"big{i}", distinct[i % len(distinct)]) for i in range(20_001)]
    fasta = write_fasta(tmp_path / "big.fa", records)
    for out, asked, parts in ((tmp_path / "auto.lmdb", (), 1),
                              (tmp_path / "asked.lmdb", ("--writers", "2"), 2)):
        result = cli("embed", fasta, "--model", tiny_pt, "--out", out,
                     "--max-residues", MAX_RESIDUES, *asked)
        assert result.exit_code == 0, result.stderr
        assert recorded_parts(out) == parts
        assert (out / "data.mdb").is_file() == (parts == 1)
        with EmbeddingStore(out) as store:
            assert len(store) == len(records)


@pytest.mark.parametrize("path", ["complete", "interrupted"])
def test_no_thread_or_child_outlives_a_run_of_part_stores(tmp_path, tiny_pt, monkeypatch, path):
    import threading

    from gpuengine.writer_process import CommitterProcess

    seqs = random_proteins([10 + (i * 11) % 60 for i in range(60)], seed=9)
    fasta = write_fasta(tmp_path / "p.fa", [(f"p{i}", s) for i, s in enumerate(seqs)])
    threads, kids = set(threading.enumerate()), set(children(os.getpid()))
    started, stop = [], threading.Event()
    real_start, real_put = CommitterProcess.start, CommitterProcess.put

    def start_spy(self):
        started.append(self)
        real_start(self)

    def put(self, *args, **kwargs):  # stopped as the first share goes to a writer
        real_put(self, *args, **kwargs)
        if path == "interrupted":
            stop.set()

    monkeypatch.setattr(CommitterProcess, "start", start_spy)
    monkeypatch.setattr(CommitterProcess, "put", put)
    config = EmbedConfig(inputs=(fasta,), model=str(tiny_pt), out=tmp_path / "s.lmdb",
                         max_tokens=96, commit_every=4, writers=3)
    summary = run_embed(config, None, stop)
    assert summary.interrupted == (path == "interrupted")
    assert len(started) == 3 and all(w.proc.returncode == 0 for w in started)
    assert [t.name for t in threading.enumerate() if t not in threads and t.is_alive()] == []
    assert sorted(set(children(os.getpid())) - kids) == []
    with EmbeddingStore(tmp_path / "s.lmdb") as store:
        assert len(store) == summary.committed_records
        assert (len(store) == 60) == (path == "complete")
    for part in _parts(tmp_path / "s.lmdb", 3):
        with EmbeddingStore(part) as store:
            [run] = store.runs().values()
            assert run["status"] == ("complete" if path == "complete" else "interrupted")
            assert run["committed_records"] == len(store)


# ----------------------------------------------------------------------------- kill -9


def _committed(out: Path) -> int:
    if recorded_parts(out) is None:
        return 0
    try:
        with EmbeddingStore(out) as store:
            return len(store)
    except (StoreError, KeyError, ValueError):
        return 0


def _wait_for_commit(proc, out: Path, stderr: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if _committed(out):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before a commit:\n"
                        f"{stderr.read_text()}")
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    pytest.fail("no commit within 180 s")


def _writer_children(pid: int, count: int) -> list[int]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = []
        for kid in children(pid):
            try:
                with open(f"/proc/{kid}/cmdline", "rb") as fh:
                    if b"gpuengine.writer_process" in fh.read():
                        found.append(kid)
            except OSError:
                continue
        if len(found) == count:
            return found
        time.sleep(0.02)
    pytest.fail(f"process {pid} did not start {count} store writer processes")


def _check_exactly_once(out: Path, workload) -> list[str]:
    with EmbeddingStore(out) as store:
        ids = list(store)
        assert len(ids) == len(set(ids)) == len(store)
        assert set(ids) <= set(workload["ids"])
        for rid, vector in store.items():
            assert np.abs(vector - workload["vectors"][rid]).max() <= 1e-6, rid
    assert _check_partition(out, 2) == len(ids)
    return ids


def _rerun(cmd, out: Path, stored: int, workload) -> None:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=child_env())
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["already_stored"] == stored > 0
    assert summary["committed_records"] == N - stored
    assert sorted(_check_exactly_once(out, workload)) == workload["ids"]


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["engine", "a part's writer"])
def test_kill_9_then_rerun_stores_every_sequence_once_across_the_parts(
        tiny_pt, tmp_path, resume_workload, victim):
    out = tmp_path / "parts.lmdb"
    cmd = command(resume_workload["fasta"], tiny_pt, out)
    proc, _, stderr = start([*cmd, "--writers", "2"], tmp_path / "killed")
    try:
        _wait_for_commit(proc, out, stderr)
        writers = _writer_children(proc.pid, 2)
        kids = children(proc.pid)
        if victim == "engine":
            proc.send_signal(signal.SIGKILL)
        else:
            os.kill(writers[1], signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = stderr.read_text()
    if victim == "engine":
        assert proc.returncode == -signal.SIGKILL
        assert wait_gone(kids), "a child outlived the engine's kill -9"
    else:
        assert proc.returncode == 1, text
        assert "store writer process" in text and "killed by signal SIGKILL" in text, text
        assert "Traceback" not in text, text
        assert wait_gone(kids), "a child outlived the run"
    stored = len(_check_exactly_once(out, resume_workload))
    assert 0 < stored < N
    _rerun(cmd, out, stored, resume_workload)  # no --writers: the recorded 2


@pytest.mark.slow
def test_bench_writer_writes_one_row_per_writer_count(tmp_path):
    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "GPUENGINE_COMMIT": "testcommit", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "tools/bench_writer.py", "--dim", "32", "--vectors",
                    "3000", "--group", "500", "--writers", "1,3", "--out", str(out),
                    "--workdir", str(tmp_path)], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["writers"], r["sequences"], r["system"]) for r in rows] == \
        [(1, 3000, "gpuengine-writer"), (3, 3000, "gpuengine-writer")]
    assert rows[0]["frames"] == 6 and rows[1]["frames"] > 6
    assert all(r["vectors_per_s"] > 0 and r["mb_per_s"] > 0 for r in rows)
