"""Many small files in one daemon run (:mod:`gpuengine.daemon.groups`), with the real engine,
the tiny random-weight ESM-2 on the CPU and a real LMDB store:

* files waiting together share one run (one engine run id in every job record), each file
  still completes on its own: in done/ once, with its own counts;
* a bad file among many goes to failed/ with its error record, alone: the others are done and
  every one of their sequences is stored once; a file that shares a record id with an earlier
  file of the group runs after it, alone, and one identical to an earlier file is finished
  from that file's job without a run;
* (slow) a real ``gpuengine serve`` process killed with SIGKILL while many files share
  batches (held after its first batches, held_process.py, so that the kill finds three files
  done and most not), then restarted: every file is in done/ exactly once, every sequence
  stored once, and the files finished before the kill are not run again.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from gpuengine.config import EmbedConfig
from gpuengine.daemon import Daemon, ServeConfig, is_ignored
from serve_processes import Served, fasta_bytes, store_counts, store_ids


def _files(n_files: int, per_file: int, prefix: str = "f") -> dict[str, tuple[bytes, list, list]]:
    """``n_files`` FASTA files of ``per_file`` proteins; file k's lengths lie in a band of its
    own (the scheduler sorts by length, so files complete one after another)."""
    files = {}
    for k in range(n_files):
        lengths = [10 + 2 * k + i % 6 for i in range(per_file)]
        files[f"{prefix}{k:03d}.fa"] = fasta_bytes(f"{prefix}{k:03d}_", per_file, seed=100 + k,
                                                   lengths=lengths)
    return files


def _daemon(tmp_path: Path, model: Path, **options) -> Daemon:
    embed = EmbedConfig(inputs=(tmp_path / "w" / "inbox",), model=str(model),
                        out=tmp_path / "store.lmdb", devices="cpu", max_tokens=256)
    config = ServeConfig(watch=tmp_path / "w", embed=embed, retry_delay=0, **options)
    daemon = Daemon(config, notify=lambda message: None)
    daemon.prepare()
    daemon.warm_up()
    daemon.job.check_store()
    return daemon


def _job(daemon: Daemon, name: str) -> dict:
    return json.loads((daemon.done / f"{name}.job.json").read_text())


def _done_files(directory: Path) -> list[str]:
    """The files in ``directory`` (not their job records, nor a temporary file a killed daemon
    left behind, which the next start removes or ignores)."""
    return sorted(n for n in os.listdir(directory)
                  if not n.endswith(".job.json") and not is_ignored(n))


def test_small_files_share_one_run_and_a_bad_one_fails_alone(tiny_pt, tmp_path):
    files = _files(12, 20)
    daemon = _daemon(tmp_path, tiny_pt)
    try:
        for name, (data, _, _) in files.items():
            (daemon.processing / name).write_bytes(data)
        bad = b">ok1\nMKVL\n>bad1\nMKV1L\n"  # a digit: an invalid residue (line 4, column 4)
        (daemon.processing / "f005b.fa").write_bytes(bad)
        # an id of f002.fa with another sequence: runs after the group, alone, and fails there
        clash = b">f002_00003 same id, another sequence\nWWWWWWWW\n"
        (daemon.processing / "f011z.fa").write_bytes(clash)
        (daemon.processing / "zcopy.fa").write_bytes(files["f000.fa"][0])  # same job as f000
        daemon.recover()
    finally:
        daemon.board.close(state="stopped")
    assert _done_files(daemon.done) == sorted([*files, "zcopy.fa"])
    assert sorted(os.listdir(daemon.failed)) == ["f005b.fa", "f005b.fa.error.json",
                                                 "f011z.fa", "f011z.fa.error.json"]
    error = json.loads((daemon.failed / "f005b.fa.error.json").read_text())
    assert (error["kind"], error["record"], error["position"]) == (
        "input", "bad1", {"line": 4, "column": 4}), error
    clashed = json.loads((daemon.failed / "f011z.fa.error.json").read_text())
    assert clashed["record"] == "f002_00003" and "store-conflict" in clashed["reason"], clashed
    runs = {_job(daemon, name)["engine_run"]["run_id"] for name in files}
    assert len(runs) == 1, "the files did not share one run"
    for name, (_, ids, _) in files.items():
        job = _job(daemon, name)
        assert job["status"] == "complete"
        assert job["counts"]["committed_records"] == job["counts"]["valid_records"] == len(ids)
        assert job["group"]["files"] == 12, job.get("group")
    copy = _job(daemon, "zcopy.fa")
    assert copy["reused"] and copy["first_file"] == "f000.fa", copy
    expected = sorted(i for _, ids, _ in files.values() for i in ids)
    assert store_ids(daemon.config.embed.out) == expected  # each once; nothing of bad files
    records, embeddings, _ = store_counts(daemon.config.embed.out)
    assert records == len(expected)
    assert embeddings == len({s for _, _, seqs in files.values() for s in seqs})
    assert json.loads((daemon.dir / "attempts.json").read_text())["files"] == {}


def test_group_files_one_runs_each_file_alone(tiny_pt, tmp_path):
    files = _files(3, 10)
    daemon = _daemon(tmp_path, tiny_pt, group_files=1)
    try:
        for name, (data, _, _) in files.items():
            (daemon.processing / name).write_bytes(data)
        daemon.recover()
    finally:
        daemon.board.close(state="stopped")
    assert _done_files(daemon.done) == sorted(files)
    assert len({_job(daemon, n)["engine_run"]["run_id"] for n in files}) == 3
    assert all("group" not in _job(daemon, n) for n in files)


N_FILES, PER_FILE = 60, 100
HELD_BATCHES = 60
"""The first daemon's group run hands out this many batches of at most 256 tokens, then one
more that it holds in flight until the SIGKILL (held_process.py). Enough for three files
done whatever the timing: the scheduler hands out the input (files in name order, each in a
length band of its own) as length-sorted runs of consecutive records, so s002 is complete
once the records of s000-s002, and those of s003-s004 of at most 19 residues, are committed:
402 records of at most 21 tokens, twelve or more to a batch, 34 batches (the hold leaves
the held one, and at most the device's pipeline depth, uncommitted). Few enough for more
than ten files left: 61 batches hold at most 61 × 21 records (12 tokens or more each), which
complete at most 12 files."""


@pytest.mark.slow
def test_sigkill_while_files_share_batches_then_restart(tiny_pt, tmp_path):
    files = _files(N_FILES, PER_FILE, prefix="s")
    watch = tmp_path / "watch"
    (watch / "inbox").mkdir(parents=True)
    for name, (data, _, _) in files.items():  # waiting together before the daemon starts
        (watch / "inbox" / name).write_bytes(data)
        (watch / "inbox" / f"{name}.done").touch()
    done = watch / "done"
    first = Served(tmp_path, tiny_pt, "--max-tokens", "256", log="first", held=HELD_BATCHES)
    try:
        first.wait_for_message("READY=1")
        first.wait_for(lambda: len([n for n in os.listdir(done) if n.endswith(".job.json")])
                       >= 3, "three files done", timeout=120)  # then it holds: no race
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    finally:
        first.close()
    left = os.listdir(watch / "processing")
    moved = [n for n in os.listdir(done) if not n.endswith(".job.json") and not is_ignored(n)]
    before = {n: (done / f"{n}.job.json").read_bytes() for n in moved}  # written before the move
    assert len(left) > 10, f"only {left} were left at the kill: the hold did not hold"
    assert sorted(moved + left) == sorted(files), (sorted(moved), left)
    second = Served(tmp_path, tiny_pt, "--max-tokens", "256", log="second")
    try:
        second.wait_for(lambda: all(second.in_done(n) for n in files),
                        "every file in done/ after the restart", timeout=180)
        assert second.stop() == 0
    finally:
        second.close()
    assert _done_files(done) == sorted(files)  # each once (no "name (1)" copies)
    assert not os.listdir(watch / "processing") and not os.listdir(watch / "failed")
    assert not [n for n in os.listdir(done) if n.endswith(".tmp")]  # the restart removed them
    for name, record in before.items():  # finished before the kill: not run again
        assert (done / f"{name}.job.json").read_bytes() == record
    shared = {json.loads((done / f"{n}.job.json").read_text())["engine_run"]["run_id"]
              for n in files}
    assert len(shared) <= 3, f"the files did not share runs: {len(shared)} runs"
    expected = sorted(i for _, ids, _ in files.values() for i in ids)
    assert store_ids(first.store) == expected  # every sequence once
    records, embeddings, _ = store_counts(first.store)
    assert records == N_FILES * PER_FILE
    assert embeddings == len({s for _, _, seqs in files.values() for s in seqs})
    for name in files:
        job = json.loads((done / f"{name}.job.json").read_text())
        counts = job["counts"]
        assert counts["committed_records"] + counts["already_stored"] == PER_FILE, (name, job)


def test_a_pinned_lookup_answers_as_the_plain_one(tmp_path):
    """The group's validation asks the store about every record from one read transaction
    (:meth:`TableLookup.pinned`): the same answers as a transaction each."""
    import numpy as np

    from gpuengine.records import FastaRecord
    from gpuengine.store import CommitEntry, ModelIdentity, OutputSpec, StoreWriter, TableSpec
    from gpuengine.store.codec import sequence_digest

    model = ModelIdentity(family="esm2", name="m", sha256="ab" * 32, num_layers=2,
                          embed_dim=4, attention_heads=2, vocab_size=33)
    spec = TableSpec(name="default", model=model, outputs=(OutputSpec(2, "mean"),),
                     store_dtype="float32", dim=4, max_residues=None)
    with StoreWriter(tmp_path / "s.lmdb") as writer:
        writer.open_table(spec)
        writer.commit("default", [CommitEntry(sequence_digest("MKV"), ("a",),
                                              {spec.outputs[0]: np.ones(4, np.float32)})])
        plain = writer.lookup("default")
        records = [FastaRecord("a", "MKV", "x.fa", 2, 0), FastaRecord("a", "MKW", "x.fa", 4, 1),
                   FastaRecord("b", "MKV", "x.fa", 6, 2)]
        expected = [plain.conflict(r) for r in records]
        with writer.lookup("default").pinned() as pinned:
            assert [pinned.conflict(r) for r in records] == expected
            assert pinned.record_digests(["a", "b"]) == plain.record_digests(["a", "b"])
    assert [p is None for p in expected] == [True, False, True]
