"""Several input processes (``gpuengine.input_workers``): blocks dealt out in turn to real
child processes come back as the chunks one reader makes, in input order, whatever the number
of children and the block size; errors come in input order with the first pass's positions;
closing reaps every child; and a run killed with SIGKILL while three children read resumes
to every record stored exactly once."""

from __future__ import annotations

import gzip
import os
import signal

import pytest

from conftest import random_proteins, write_fasta
from gpuengine.errors import InputError, UsageError
from gpuengine.fasta import stream_valid, validate
from gpuengine.input_workers import InputPool, process_count
from gpuengine.inputs import InThreadInput, tokenizer_spec
from gpuengine.tokenization import ESM_RESIDUES, EsmTokenizer
from fastq_files import fastq_text
from process_tree import wait_gone

ALPHABET = frozenset(ESM_RESIDUES)


def _files(tmp_path):
    """A FASTA with wrapped lines, bad records and repeats; a gzip FASTQ; a CRLF FASTA."""
    seqs = random_proteins([3 + (i * 29) % 400 for i in range(300)], seed=8)
    records = [(f"p{i} description", s) for i, s in enumerate(seqs)]
    records[17] = ("bad17", "MKJ")
    records[200] = ("p5 again", seqs[5])  # the same id and sequence: embedded once
    a = write_fasta(tmp_path / "a.fa", records)
    b = tmp_path / "b.fq.gz"
    b.write_bytes(gzip.compress(fastq_text([(f"q{i}", s) for i, s in enumerate(seqs[:120])])
                                .encode()))
    c = tmp_path / "c.fa"
    c.write_bytes(write_fasta(tmp_path / "c.tmp", records[:50]).read_bytes()
                  .replace(b"\n", b"\r\n").replace(b">p", b">c"))
    return [a, b, c]


def _pool(paths, report, processes, block_size, tok):
    skip: dict[str, list[int]] = {}
    for name, index in report.skip:
        skip.setdefault(name, []).append(index)
    return InputPool(paths, skip, ALPHABET, 100, tokenizer_spec(tok), 64, processes, block_size)


def _flat(chunks):
    ids, digests, tokens, truncated = [], [], [], []
    for chunk in chunks:
        ids += chunk.ids
        digests += chunk.digests
        tokens += [chunk.token_ids(i).tolist() for i in range(len(chunk.ids))]
        truncated += chunk.truncated.tolist()
    return ids, digests, tokens, truncated


@pytest.mark.parametrize("processes, block_size", [(1, 1 << 19), (3, 300), (4, 4096)])
def test_pool_gives_the_chunks_of_one_reader_in_order(tmp_path, processes, block_size):
    paths = _files(tmp_path)
    report = validate(paths, alphabet=ALPHABET, skip_invalid=True)
    tok = EsmTokenizer()
    expected = _flat(InThreadInput(lambda: stream_valid(paths, report, alphabet=ALPHABET),
                                   tok, 100, 64).chunks())
    assert len(expected[0]) == report.valid == 300 + 120 + 50 - 3
    with _pool(paths, report, processes, block_size, tok) as pool:
        got = _flat(pool.chunks())
        children = [c.proc for c in pool.children]
    assert got == expected
    assert all(proc.returncode is not None for proc in children)


@pytest.mark.parametrize("index", [0, 2])
def test_a_sharded_pool_keeps_the_shard_as_one_reader_does(tmp_path, index):
    from gpuengine.shards import Shard

    paths = _files(tmp_path)
    report = validate(paths, alphabet=ALPHABET, skip_invalid=True)
    tok, shard = EsmTokenizer(), Shard(index, 3)
    expected = _flat(InThreadInput(lambda: stream_valid(paths, report, alphabet=ALPHABET),
                                   tok, 100, 64, None, shard).chunks())
    assert 0 < len(expected[0]) < report.valid
    skip: dict[str, list[int]] = {}
    for name, i in report.skip:
        skip.setdefault(name, []).append(i)
    with InputPool(paths, skip, ALPHABET, 100, tokenizer_spec(tok), 64, 3, 700, shard) as pool:
        assert _flat(pool.chunks()) == expected


def test_a_file_changed_after_validation_fails_in_input_order(tmp_path):
    paths = _files(tmp_path)[:1]
    report = validate(paths, alphabet=ALPHABET, skip_invalid=True)
    text = paths[0].read_text().splitlines()
    at = next(i for i, line in enumerate(text) if line.startswith(">p250 "))
    text[at + 1] = "MK" + "J" + text[at + 1][3:]
    paths[0].write_text("\n".join(text) + "\n")
    with _pool(paths, report, 3, 500, EsmTokenizer()) as pool:
        ids = []
        with pytest.raises(InputError) as caught:
            for chunk in pool.chunks():
                ids += chunk.ids
    assert f"{paths[0]}:{at + 2}:3: record 'p250' (#251 in file): invalid-character 'J'" \
        in str(caught.value)
    assert ids == [f"p{i}" for i in range(250) if i not in (17, 200)][:len(ids)] and len(ids) >= 200


def test_a_killed_child_fails_the_read_and_close_reaps_all(tmp_path):
    paths = _files(tmp_path)
    report = validate(paths, alphabet=ALPHABET, skip_invalid=True)
    pool = _pool(paths, report, 3, 300, EsmTokenizer())
    try:  # killed while it starts (a child that finished its blocks before has done its part)
        os.kill(pool.children[1].proc.pid, signal.SIGKILL)
        ids = []
        with pytest.raises(InputError, match=r"was killed by signal SIGKILL before the end"):
            for chunk in pool.chunks():
                ids += chunk.ids
        assert ids == [f"p{i}" for i in range(len(ids))] and ids  # block 0, from child 0
    finally:
        pool.close()
    assert all(c.proc.returncode is not None for c in pool.children)
    assert not pool._feeder.is_alive()


def test_close_in_the_middle_stops_feeder_and_children(tmp_path):
    paths = _files(tmp_path)
    report = validate(paths, alphabet=ALPHABET, skip_invalid=True)
    pool = _pool(paths, report, 2, 200, EsmTokenizer())
    next(pool.chunks())
    pool.close()
    pool.close()  # idempotent
    assert not pool._feeder.is_alive()
    assert all(c.proc.returncode is not None for c in pool.children)


def test_process_count(monkeypatch):
    from gpuengine.config import environment

    monkeypatch.setenv("GPUENGINE_INPUT_PROCESSES", "3")
    monkeypatch.setenv("GPUENGINE_INPUT_BLOCK_BYTES", "2000")
    env = environment()
    assert (env.input_processes, env.input_block_bytes) == (3, 2000)
    assert process_count(env.input_processes) == 3
    for bad in ("0", "x", "33", "-1"):
        monkeypatch.setenv("GPUENGINE_INPUT_PROCESSES", bad)
        with pytest.raises(UsageError, match="GPUENGINE_INPUT_PROCESSES"):
            environment()
    monkeypatch.delenv("GPUENGINE_INPUT_PROCESSES")
    assert environment().input_processes is None
    cores = len(os.sched_getaffinity(0))
    assert process_count(None) == min(16, max(cores - 2, min(cores, 2)))
    assert process_count(None, heavy=False) == min(4, max(1, cores - 2))
    assert process_count(5, heavy=False) == 5


@pytest.mark.slow
def test_sigkill_with_three_input_processes_resumes_exactly_once(
        tiny_pt, tmp_path, resume_workload, monkeypatch):
    from embed_processes import check_store, command, kill_after_first_commit, \
        rerun_to_completion, run_records

    workload = resume_workload

    monkeypatch.setenv("GPUENGINE_INPUT_PROCESS", "1")
    monkeypatch.setenv("GPUENGINE_INPUT_PROCESSES", "3")
    monkeypatch.setenv("GPUENGINE_INPUT_BLOCK_BYTES", "2000")  # about 20 records a block
    out = tmp_path / "store.lmdb"
    cmd = command(workload["fasta"], tiny_pt, out)
    _, children = kill_after_first_commit(cmd, out, tmp_path / "killed")
    assert len(children) == 3
    assert wait_gone(children), "an input process outlived the engine"
    stored = len(check_store(out, workload))
    [run] = run_records(out)
    assert run["status"] == "running" and run["committed_records"] == stored > 0
    if stored < len(workload["ids"]):
        rerun_to_completion(cmd, out, stored, workload)
    assert sorted(check_store(out, workload)) == workload["ids"]


def test_a_read_error_of_the_feeder_comes_after_the_blocks_read_before_it(tmp_path):
    paths = _files(tmp_path)[1:2]  # the gzip FASTQ
    report = validate(paths, alphabet=ALPHABET, skip_invalid=True)
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[:len(data) * 2 // 3])  # truncated after validation
    with _pool(paths, report, 2, 500, EsmTokenizer()) as pool:
        ids = []
        with pytest.raises(InputError, match="truncated or corrupt gzip data"):
            for chunk in pool.chunks():
                ids += chunk.ids
    assert ids == [f"q{i}" for i in range(len(ids))] and ids


@pytest.mark.slow
def test_sigkill_during_shared_validation_leaves_no_validation_process(tiny_pt, tmp_path):
    """The engine killed while validation processes share the first pass: each of them
    exits (its input ends) and the store holds nothing, so a rerun starts afresh."""
    import subprocess
    import time

    from embed_processes import child_env, command
    from process_tree import children

    path = tmp_path / "many.fa"
    with open(path, "w") as fh:
        for i in range(150_000):
            fh.write(f">r{i}\nMKVL{'ACDEFGHIKLMNPQRSTVWY'[i % 20] * (i % 40)}\n")
    out = tmp_path / "store.lmdb"
    env = dict(child_env(), GPUENGINE_INPUT_PROCESS="1", GPUENGINE_INPUT_PROCESSES="4",
               GPUENGINE_INPUT_BLOCK_BYTES="2000")
    proc = subprocess.Popen(command(path, tiny_pt, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    seen: list[int] = []
    deadline = time.monotonic() + 60
    try:
        while len(seen) < 4 and proc.poll() is None and time.monotonic() < deadline:
            for pid in children(proc.pid):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        if b"gpuengine.validation_workers" in fh.read() and pid not in seen:
                            seen.append(pid)
                except OSError:
                    pass
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(seen) == 4, proc.stderr.read().decode()[-2000:]
    assert wait_gone(seen), "a validation process outlived the engine"
    assert not (out / "data.mdb").exists() or committed_nothing(out)


def committed_nothing(out) -> bool:
    from gpuengine import EmbeddingStore
    from gpuengine.errors import StoreError

    try:
        with EmbeddingStore(out) as store:
            return len(store) == 0
    except StoreError:
        return True
