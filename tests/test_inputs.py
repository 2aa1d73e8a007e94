"""``gpuengine.inputs``: records in, prepared chunks out, read in a child process or in the
planner's thread. The input process (``EmbedConfig.input_process``: FASTA read, hashed and
tokenized in a child that streams framed chunks to the planner) must store exactly what the
in-thread path stores, report the same input errors, fail clearly when the child dies, and leave
no process behind; its frames round-trip; records given in memory stay in the planner's
thread."""

from __future__ import annotations

import gzip
import signal
import sys

import numpy as np
import pytest

from cli_runs import LAST
from conftest import random_proteins, write_fasta
from embed_processes import (check_store, command, interrupt, kill_after_first_commit,
                             rerun_to_completion, run_records)
from gpuengine.errors import InputError
from gpuengine.input_workers import process_count
from process_tree import wait_gone

PROTEIN_IDS = [f"q{i}" for i in range(60)] + ["Ä-ünïcode", "sp|P1|X"]


@pytest.fixture
def spawned(monkeypatch):
    """Every InputProcess the engine starts, to check that each was reaped."""
    from gpuengine import inputs as input_module

    made = []
    real_init = input_module.InputProcess.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(input_module.InputProcess, "__init__", init)
    yield made
    for reader in made:
        assert reader.proc.returncode is not None, "input process not reaped"


def _inputs(tmp_path):
    """A plain and a gzip file: repeated sequences under other ids, an id given twice with
    the same sequence, long sequences (truncated at 50), lower case, a trailing '*', and an
    invalid record (skipped)."""
    seqs = random_proteins([5 + (i * 13) % 90 for i in range(len(PROTEIN_IDS))], seed=5)
    for i in range(8, len(seqs), 8):
        seqs[i] = seqs[i - 3]
    records = list(zip(PROTEIN_IDS, seqs))
    records[4] = (records[4][0], records[4][1].lower() + "*")
    plain = write_fasta(tmp_path / "a.fa", records[:30] + [("bad", "MKJJ"), records[2]])
    text = write_fasta(tmp_path / "b.tmp", records[30:]).read_bytes()
    packed = tmp_path / "b.fa.gz"
    packed.write_bytes(gzip.compress(text))
    return [plain, packed]


def _embed(tiny_pt, inputs, out, *, input_process, **options):
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed

    config = EmbedConfig(inputs=tuple(inputs), model=str(tiny_pt), out=out, max_tokens=64,
                         commit_every=16, skip_invalid=True, max_residues=50,
                         layers=(1, -1), pools=("mean", "bos"), input_process=input_process,
                         **options)
    return run_embed(config)


class _OneByOne:
    """The real runner, made to embed a batch's sequences one at a time. Which sequences
    share a packed batch follows timing (when the planner's items reach the scheduler), and
    a packed batch's vectors may differ from a single sequence's in the last bits; one at a
    time, both paths' vectors compare bit for bit."""

    def __init__(self, runner):
        self.runner = runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def stage(self, items):
        return items

    def launch(self, items):
        return items

    def finish(self, items):
        from gpuengine.runner import EmbeddedBatch

        done = [self.runner.embed([item]) for item in items]
        return EmbeddedBatch({o: [d.vectors[o][0] for d in done] for o in self.runner.outputs},
                             np.concatenate([d.finite for d in done]),
                             sum(d.n_tokens for d in done), sum(d.seconds for d in done))


@pytest.fixture(autouse=True)
def _one_by_one(monkeypatch):
    from gpuengine import replicas

    real = replicas._make_runner
    monkeypatch.setattr(replicas, "_make_runner", lambda *a: _OneByOne(real(*a)))


def _contents(out):
    from gpuengine import EmbeddingStore

    found = {}
    for layer in (1, LAST):
        for pool in ("mean", "bos"):
            with EmbeddingStore(out, layer=layer, pool=pool) as store:
                found[layer, pool] = dict(store.items())
    return found


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert sorted(a[key]) == sorted(b[key]), key
        for rid, vector in a[key].items():
            assert vector.dtype == b[key][rid].dtype
            np.testing.assert_array_equal(vector, b[key][rid])  # bit-identical (CPU fp32)


SUMMARY = ("records_read", "valid_records", "invalid_skipped", "duplicate_records", "truncated",
           "already_stored", "deduplicated", "embedded", "committed_records", "tokens",
           "residues", "failed", "exit_code")


def test_stores_what_the_in_process_planner_stores(tiny_pt, tmp_path, monkeypatch, spawned):
    from gpuengine import inputs as input_module

    monkeypatch.setattr(input_module, "LOOKUP_CHUNK", 7)  # many chunks, across the two files
    inputs = _inputs(tmp_path)
    summaries = {}
    for mode in (False, True):
        summaries[mode] = _embed(tiny_pt, inputs, tmp_path / f"{mode}.lmdb",
                                 input_process=mode).to_json()
    assert len(spawned) == process_count(heavy=False)
    for field in SUMMARY:
        assert summaries[True][field] == summaries[False][field], field
    assert summaries[True]["truncated"] > 0 and summaries[True]["deduplicated"] > 0
    _same(_contents(tmp_path / "True.lmdb"), _contents(tmp_path / "False.lmdb"))


def test_resumes_a_store_exactly_once(tiny_pt, tmp_path, monkeypatch, spawned):
    """A store holding part of the input (an earlier run): the child's chunks go through the
    per-id lookups; each id is committed once, with the same vectors as one full run."""
    from gpuengine import inputs as input_module

    monkeypatch.setattr(input_module, "LOOKUP_CHUNK", 5)
    inputs = _inputs(tmp_path)
    _embed(tiny_pt, inputs[:1], tmp_path / "resumed.lmdb", input_process=False)
    resumed = _embed(tiny_pt, inputs, tmp_path / "resumed.lmdb", input_process=True)
    full = _embed(tiny_pt, inputs, tmp_path / "full.lmdb", input_process=False)
    assert resumed.already_stored > 0
    assert resumed.already_stored + resumed.committed_records == full.committed_records
    again = _embed(tiny_pt, inputs, tmp_path / "resumed.lmdb", input_process=True)
    assert again.committed_records == 0 and again.embedded == 0
    assert again.already_stored == full.committed_records
    _same(_contents(tmp_path / "resumed.lmdb"), _contents(tmp_path / "full.lmdb"))
    assert len(spawned) == 2 * process_count(heavy=False)


def test_validation_processes_judge_the_input_as_the_engine_alone(tiny_pt, tmp_path,
                                                                   monkeypatch):
    """``GPUENGINE_INPUT_PROCESS=1`` with four processes: the first pass over every file is
    shared among validation processes (blocks of 300 bytes); over a store holding part of the
    input, and one id it maps to another sequence, the run counts and stores what a run
    validating in its own process does."""
    from gpuengine import validation_workers

    monkeypatch.setenv("GPUENGINE_INPUT_PROCESSES", "4")
    monkeypatch.setenv("GPUENGINE_INPUT_BLOCK_BYTES", "300")
    shared = []
    real = validation_workers.tally_in_processes
    monkeypatch.setattr(validation_workers, "tally_in_processes",
                        lambda path, *a: shared.append(path) or real(path, *a))
    inputs = _inputs(tmp_path)
    other = write_fasta(tmp_path / "c.fa", [("q3", "MKVLA"), ("new1", "MKKKL")])
    summaries = {}
    for mode in (False, True):
        out = tmp_path / f"{mode}.lmdb"
        _embed(tiny_pt, inputs[:1], out, input_process=False)
        summaries[mode] = _embed(tiny_pt, [*inputs, other], out, input_process=mode).to_json()
    assert shared == [*inputs, other]  # the second run with input processes only
    for field in SUMMARY:
        assert summaries[True][field] == summaries[False][field], field
    assert summaries[True]["already_stored"] > 0 and summaries[True]["invalid_skipped"] == 2
    assert 0 < summaries[True]["validate_seconds"] < summaries[True]["wall_seconds"]
    _same(_contents(tmp_path / "True.lmdb"), _contents(tmp_path / "False.lmdb"))


class _ChangeFileAfterValidation:
    """A progress sink that makes a record invalid once validation has passed."""

    def __init__(self, path, old, new):
        self.path, self.old, self.new = path, old, new

    def stage(self, message):
        if message.startswith("reading weights"):
            text = self.path.read_text()
            assert self.old in text
            self.path.write_text(text.replace(self.old, self.new, 1))

    def start(self, *args):
        pass

    def update(self, snapshot):
        pass

    def close(self):
        pass


def test_input_error_in_the_child_names_file_record_and_position(tiny_pt, tmp_path, spawned):
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed

    seqs = random_proteins([30] * 20, seed=2)
    fasta = write_fasta(tmp_path / "p.fa", [(f"r{i}", s) for i, s in enumerate(seqs)])
    line = seqs[12][:10]
    sink = _ChangeFileAfterValidation(fasta, line, line[:3] + "J" + line[4:])
    config = EmbedConfig(inputs=(fasta,), model=str(tiny_pt), out=tmp_path / "s.lmdb",
                         input_process=True)
    with pytest.raises(InputError) as caught:
        run_embed(config, progress=sink)
    message = str(caught.value)
    assert f"{fasta} changed since it was validated: {fasta}:26:4: record 'r12' (#13 in file): " \
           "invalid-character 'J'" in message
    assert caught.value.exit_code == 1
    assert len(spawned) == process_count(heavy=False)


def _crashing(monkeypatch, script):
    from gpuengine import inputs as input_module

    monkeypatch.setattr(input_module.InputProcess, "command", [sys.executable, "-c", script])


@pytest.mark.parametrize("script, how", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "was killed by signal SIGKILL"),
    ("import os, struct, sys; os.write(1, struct.pack('<4sQ', b'CHNK', 999) + b'x'); "
     "sys.exit(3)", "exited with status 3"),
])
def test_a_dead_child_fails_the_run_and_keeps_the_store(tiny_pt, tmp_path, monkeypatch,
                                                         spawned, script, how):
    inputs = _inputs(tmp_path)
    out = tmp_path / "s.lmdb"
    _embed(tiny_pt, inputs[:1], out, input_process=False)
    before = _contents(out)
    _crashing(monkeypatch, script)
    with pytest.raises(InputError, match=f"input reader process \\(pid \\d+\\) {how} before "
                                         "the end of the input"):
        _embed(tiny_pt, inputs, out, input_process=True)
    _same(_contents(out), before)
    assert len(spawned) == process_count(heavy=False)


def test_an_unexpected_child_error_is_reported_as_a_bug(tiny_pt, tmp_path, monkeypatch, spawned):
    from gpuengine.errors import InternalError

    _crashing(monkeypatch, "from gpuengine import inputs as m; "
                           "m._make_tokenizer = lambda spec: 1 / 0; m.main()")
    with pytest.raises(InternalError, match="ZeroDivisionError"):
        _embed(tiny_pt, _inputs(tmp_path), tmp_path / "s.lmdb", input_process=True)


def test_chunk_frames_round_trip():
    from gpuengine.inputs import decode_chunk, encode_chunk, prepare_chunk
    from gpuengine.records import FastaRecord
    from gpuengine.store.codec import sequence_digest
    from gpuengine.tokenization import EsmTokenizer

    tok = EsmTokenizer()
    seqs = ["MKV", "A" * 40, "LAGVS"]
    records = [FastaRecord(rid, s, "f", 1, i) for i, (rid, s) in enumerate(zip(["a", "Ä|b", "c"], seqs))]
    chunk = prepare_chunk(records, tok, 10)
    frame = b"".join(bytes(part) for part in encode_chunk(chunk))
    back = decode_chunk(bytearray(frame[12:]))
    assert back.ids == ["a", "Ä|b", "c"]
    assert back.digests == [sequence_digest(s[:10]) for s in seqs]
    assert back.residues.tolist() == [3, 10, 5] and back.truncated.tolist() == [0, 1, 0]
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(back.token_ids(i), tok.encode(s, 10))
    assert back.tokens.flags.writeable


@pytest.mark.slow
def test_sigkill_of_the_engine_ends_the_child_and_rerun_completes(
        tiny_pt, tmp_path, resume_workload, monkeypatch):
    monkeypatch.setenv("GPUENGINE_INPUT_PROCESS", "1")
    out = tmp_path / "store.lmdb"
    cmd = command(resume_workload["fasta"], tiny_pt, out)
    _, kids = kill_after_first_commit(cmd, out, tmp_path / "killed")
    assert wait_gone(kids), "the input process outlived the engine"
    stored = len(check_store(out, resume_workload))
    assert 0 < stored
    [run] = run_records(out)
    assert run["status"] == "running" and run["committed_records"] == stored
    if stored < len(resume_workload["ids"]):
        rerun_to_completion(cmd, out, stored, resume_workload)


@pytest.mark.slow
def test_sigint_drains_with_the_child(tiny_pt, tmp_path, resume_workload, monkeypatch):
    import json

    monkeypatch.setenv("GPUENGINE_INPUT_PROCESS", "1")
    out = tmp_path / "store.lmdb"
    proc = interrupt(command(resume_workload["fasta"], tiny_pt, out), out, tmp_path / "int",
                     [signal.SIGINT])
    summary = json.loads((tmp_path / "int.out").read_text())
    assert summary["interrupted"] is True and proc.returncode == 130
    assert len(check_store(out, resume_workload)) == summary["committed_records"] > 0
    assert "Traceback" not in (tmp_path / "int.err").read_text()


def test_no_input_process_for_records_given_in_memory(tiny_pt, tmp_path, spawned):
    """Records a workflow derives (a RecordSource without FASTA) stay in the planner thread."""
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed
    from gpuengine.inputs import RecordSource
    from gpuengine.records import FastaRecord

    seqs = random_proteins([12, 20], seed=1)
    records = [FastaRecord(f"m{i}", s, "mem", i + 1, i) for i, s in enumerate(seqs)]
    fasta = tmp_path / "names-the-run.fa"
    fasta.write_text("")
    config = EmbedConfig(inputs=(fasta,), model=str(tiny_pt), out=tmp_path / "s.lmdb",
                         input_process=True)
    summary = run_embed(config, records=RecordSource(lambda: records, 2, 32))
    assert summary.committed_records == 2 and not spawned


def test_environment_switch(monkeypatch):
    from gpuengine.config import environment
    from gpuengine.errors import UsageError

    monkeypatch.setenv("GPUENGINE_INPUT_PROCESS", "1")
    assert environment().input_process is True
    monkeypatch.setenv("GPUENGINE_INPUT_PROCESS", "0")
    assert environment().input_process is False
    monkeypatch.delenv("GPUENGINE_INPUT_PROCESS")
    assert environment().input_process is None
    monkeypatch.setenv("GPUENGINE_INPUT_PROCESS", "yes")
    with pytest.raises(UsageError):
        environment()

