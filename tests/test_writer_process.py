"""The writer process (gpuengine.writer_process): a commit group crosses the pipe as raw frames
and the child commits exactly what the writer thread would (same encoding, same bytes), with
group commit, run records in the same transaction, the counters and the ledger release after
the durable commit, and the child's errors raised in the engine as the same class and message."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from gpuengine.committer import Committer
from gpuengine.errors import InternalError, StoreError, StoreMismatchError
from gpuengine.ledger import Ledger
from gpuengine.store import (CommitEntry, EmbeddingStore, ModelIdentity, OutputSpec, StoreWriter,
                             TableSpec, sequence_digest)
from gpuengine.store.commit_group import CommitRows, encode_for_commit, group_nbytes, merge_encoded
from gpuengine.store.group_frames import decode_group, encode_group, split_payload
from gpuengine.writer_process import CommitterProcess

MEAN, BOS, TOKENS = OutputSpec(6, "mean"), OutputSpec(6, "bos"), OutputSpec(6, "per-token")
DIM = 8
RUN = "run-1"
MODEL = ModelIdentity(family="esm2", name="esm2_t6_8M_UR50D", sha256="ab" * 32, num_layers=6,
                      embed_dim=DIM, attention_heads=4, vocab_size=33)


def spec_of(*outputs, dtype="float32") -> TableSpec:
    return TableSpec(name="default", model=MODEL, outputs=outputs, store_dtype=dtype, dim=DIM,
                     max_residues=1022)


@pytest.fixture
def writer(tmp_path: Path):
    with StoreWriter(tmp_path / "x.lmdb") as w:
        w.open_table(spec_of(MEAN))
        w.begin_run(RUN, {"command": "test"})
        yield w


def rows(ledger: Ledger, first: int, n: int) -> CommitRows:
    digests = [sequence_digest(f"S{i}") for i in range(first, first + n)]
    ledger.claim_many([(d, f"r{i}") for i, d in zip(range(first, first + n), digests)],
                      lambda ds: [False] * len(ds))
    ids = ledger.to_committing_many(digests)
    return CommitRows(digests, ids, {MEAN: np.stack([np.full(DIM, i, np.float32)
                                                     for i in range(first, first + n)])})


def stored(path) -> dict[str, float]:
    with EmbeddingStore(path) as store:
        return {rid: float(store[rid][0]) for rid in store.ids()}


def frame_payload(group, extra=None) -> bytearray:
    """A ``GRUP`` frame's payload, as the sender writes it down the pipe."""
    return bytearray(b"".join(bytes(memoryview(b).cast("B")) for b in encode_group(group, extra)))


def round_trip(group, spec, extra=None):
    header, blobs = split_payload(frame_payload(group, extra))
    assert header["extra"] == extra and header["nbytes"] == group_nbytes(group)
    return decode_group(header, blobs, spec.outputs)


def test_a_decoded_group_encodes_to_the_same_store_bytes():
    spec = spec_of(MEAN, BOS, TOKENS, dtype="float16")
    rng = np.random.default_rng(3)
    d = [sequence_digest(f"P{i}") for i in range(6)]
    group = [
        CommitRows(d[:3], [("a",), ("b", "b2", "séq_ü"), ("x" * 600,)],
                   {MEAN: rng.standard_normal((3, DIM)).astype(np.float32),
                    BOS: [rng.standard_normal(DIM).astype(np.float32) for _ in range(3)],
                    TOKENS: [rng.standard_normal((k, DIM)).astype(np.float32) for k in (2, 5, 1)]},
                   tuple([spec.embedding_key(o, x) for x in d[:3]] for o in spec.outputs)),
        CommitEntry(d[0], ("alias-1",), None),
        CommitEntry(d[1], ("alias\x00nul", "alias-3"), None),
        CommitEntry(d[3], ("one",), {MEAN: np.ones(DIM), BOS: np.zeros(DIM, np.float16),
                                     TOKENS: np.ones((3, DIM), np.float32)}),
        CommitRows(d[4:], [("c",), ("d",)], {MEAN: np.zeros((2, DIM), np.float16),
                                            BOS: np.ones((2, DIM), np.float64),
                                            TOKENS: [np.ones((1, DIM)), np.zeros((4, DIM))]}),
        CommitEntry(d[5], ("alias-4",), None),
    ]
    back = round_trip(group, spec, {"job": {"n": 1, "t": [1.5, None]}})
    want, got = encode_for_commit(spec, group), encode_for_commit(spec, back)
    assert [(k, bytes(memoryview(v).cast("B"))) for k, v in got.arrays] == \
        [(k, bytes(memoryview(v).cast("B"))) for k, v in want.arrays]
    assert got.ids == want.ids and got.aliases == want.aliases
    assert (got.sequences, got.nbytes) == (want.sequences, want.nbytes)


def test_a_bad_vector_is_the_same_error_after_the_pipe():
    spec = spec_of(MEAN)
    group = [CommitRows([sequence_digest("A")], [("a",)], {MEAN: [np.zeros(DIM + 1)]})]
    for g in (group, round_trip(group, spec)):
        with pytest.raises(InternalError, match=r"array has shape \(9,\), expected \(8,\)"):
            encode_for_commit(spec, g)


def test_groups_encoded_one_by_one_merge_into_the_encoding_of_them_all():
    spec = spec_of(MEAN)
    d = [sequence_digest(f"S{i}") for i in range(40)]
    rng = np.random.default_rng(5)
    groups = [[CommitRows(d[a:b], [(f"r{i}",) for i in range(a, b)],
                          {MEAN: rng.standard_normal((b - a, DIM)).astype(np.float32)})]
              for a, b in ((0, 15), (15, 30), (10, 40))]  # d[10:30] twice: later values last
    groups.append([CommitEntry(d[3], ("alias",), None)])
    want = encode_for_commit(spec, [part for g in groups for part in g])
    got = merge_encoded([encode_for_commit(spec, g) for g in groups])
    assert [(k, bytes(memoryview(v).cast("B"))) for k, v in got.arrays] == \
        [(k, bytes(memoryview(v).cast("B"))) for k, v in want.arrays]
    assert got.ids == want.ids and got.aliases == want.aliases
    assert (got.sequences, got.nbytes) == (want.sequences, want.nbytes)
    keys = [k for k, _ in got.arrays]
    assert keys == sorted(keys) and len(keys) == 15 + 15 + 30


def committer(writer, ledger, **kwargs) -> CommitterProcess:
    return CommitterProcess(writer.path, writer.stored_spec("default"), RUN, ledger, **kwargs)


def test_the_child_commits_groups_counts_them_and_releases_the_ledger(writer):
    ledger = Ledger()
    process = committer(writer, ledger)
    for g in range(5):  # queued before the child starts: they wait together
        process.put([rows(ledger, 10 * g, 10)])
    process.start()
    process.wait_idle()
    counts = process.snapshot()
    assert (counts.groups, counts.sequences, counts.records) == (5, 50, 50)
    assert 1 <= counts.transactions <= 5 and counts.busy_seconds > 0
    assert not ledger._committing  # every digest released once durable
    process.finish()
    assert process.error is None and not process.is_alive()
    assert process.proc.returncode == 0
    assert stored(writer.path) == {f"r{i}": float(i) for i in range(50)}
    assert writer.run_record(RUN)["committed_sequences"] == 50


def test_waiting_groups_merge_up_to_the_byte_cap_with_the_last_run_records(writer):
    ledger = Ledger()
    groups = [[rows(ledger, 10 * g, 10)] for g in range(5)]
    process = committer(writer, ledger, max_bytes=2 * group_nbytes(groups[0]))
    process.start()
    process.put(groups[0], extra_runs={"job-1": {"status": "running", "n": 1}})
    process.wait_idle()
    process.put([], extra_runs={"job-2": {"n": 0}})  # run records alone are committed too
    for group in groups[1:]:
        process.put(group, extra_runs={"job-1": {"status": "complete", "n": 2}})
    process.finish()
    counts = process.snapshot()
    assert counts.groups == 6 and counts.sequences == 50
    assert counts.transactions >= 3  # the first alone, then at most two groups of vectors in one
    assert writer.run_record("job-1") == {"status": "complete", "n": 2}
    assert writer.run_record("job-2") == {"n": 0}


def test_a_store_mismatch_in_the_child_is_raised_with_its_message(writer):
    ledger = Ledger()
    writer.commit("default", [CommitEntry(sequence_digest("OTHER"), ("r12",),
                                          {MEAN: np.zeros(DIM, np.float32)})])
    thread = Committer(writer, "default", RUN, Ledger())
    thread.put([rows(Ledger(), 10, 10)])
    thread.start()
    thread.finish()
    process = committer(writer, ledger)
    process.start()
    process.put([rows(ledger, 0, 10)])
    process.put([rows(ledger, 10, 10)])  # r12 names another sequence in the store
    process.wait_idle()  # returns after the failure
    process.put([rows(ledger, 20, 10)])  # dropped, not blocking
    process.finish()
    assert type(process.error) is StoreMismatchError
    assert str(process.error) == str(thread.error)
    assert stored(writer.path).get("r12") == 0.0 and "r15" not in stored(writer.path)
    assert "r25" not in stored(writer.path)


def test_a_group_that_cannot_be_encoded_fails_after_the_groups_before_it_commit(writer):
    ledger = Ledger()
    process = committer(writer, ledger)
    bad = CommitRows([sequence_digest("BAD")], [("bad",)], {MEAN: np.zeros((1, DIM + 1))})
    process.put([rows(ledger, 0, 10)])  # queued before the child starts: they wait together
    process.put([rows(ledger, 10, 10)])
    process.put([bad])
    process.put([rows(ledger, 20, 10)])
    process.start()
    process.finish()
    assert type(process.error) is InternalError
    assert "array has shape (1, 9), expected (1, 8)" in str(process.error)
    assert stored(writer.path) == {f"r{i}": float(i) for i in range(20)}
    assert process.snapshot().sequences == 20


def test_an_alias_without_its_vectors_is_an_internal_error(writer):
    process = committer(writer, Ledger())
    process.start()
    process.put([CommitEntry(sequence_digest("NEVER"), ("r1",), None)])
    process.finish()
    assert type(process.error) is InternalError
    assert "alias-only commit" in str(process.error)


def test_a_child_killed_mid_run_is_a_store_error(writer):
    ledger = Ledger()
    process = committer(writer, ledger)
    process.start()
    process.put([rows(ledger, 0, 10)])
    process.wait_idle()
    process.proc.kill()
    deadline = time.monotonic() + 10
    while process.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.put([rows(ledger, 10, 10)])  # dropped, not blocking
    process.finish()
    assert type(process.error) is StoreError
    assert "killed by signal SIGKILL" in str(process.error)
    assert "rerun to resume" in str(process.error)
    assert stored(writer.path) == {f"r{i}": float(i) for i in range(10)}


def test_a_child_that_cannot_open_the_store_says_why(tmp_path):
    process = CommitterProcess(tmp_path / "nothing", spec_of(MEAN), RUN, Ledger())
    (tmp_path / "nothing").write_text("a file, not a store")
    process.start()
    process.put([CommitEntry(sequence_digest("A"), ("a",), {MEAN: np.zeros(DIM)})])
    process.finish()
    assert isinstance(process.error, StoreError)
    assert "not a gpuengine store" in str(process.error)


def test_the_child_grows_the_map_and_the_engine_reads_on(tmp_path):
    wide = TableSpec(name="default", model=ModelIdentity(
        family="esm2", name="esm2_t6_8M_UR50D", sha256="ab" * 32, num_layers=6, embed_dim=1024,
        attention_heads=4, vocab_size=33), outputs=(MEAN,), store_dtype="float32", dim=1024,
        max_residues=1022)
    with StoreWriter(tmp_path / "small.lmdb", initial_map_size=1 << 20) as writer:
        writer.open_table(wide)
        writer.begin_run(RUN, {"command": "test"})
        lookup = writer.lookup("default")
        assert lookup.record_count() == 0
        process = CommitterProcess(writer.path, wide, RUN, Ledger(), map_size=writer.map_size)
        process.start()
        for g in range(8):  # 8 x 256 x 4 KiB: 8 MiB, the map was 1 MiB
            digests = [sequence_digest(f"W{g}-{i}") for i in range(256)]
            process.put([CommitRows(digests, [(f"w{g}-{i}",) for i in range(256)],
                                    {MEAN: np.full((256, 1024), g, np.float32)})])
        process.finish()
        assert process.error is None and process.snapshot().records == 2048
        assert lookup.record_count() == 2048  # a map grown by another process is adopted
        assert writer.map_size > 8 << 20
        writer.finish_run(RUN, "complete", {})  # and written to
    with EmbeddingStore(tmp_path / "small.lmdb") as store:
        assert float(store["w7-255"][0]) == 7.0 and len(store) == 2048


def test_the_child_stops_reading_while_it_holds_twice_a_transaction(writer):
    """The child's reading thread waits while the groups read but not committed hold
    ``_CHILD_BYTES_FACTOR × max_bytes`` of vectors (whatever their number), and goes on once
    the committing thread has written a merge; a group that alone exceeds it still passes."""
    import io
    import threading

    from gpuengine.writer_process import _CHILD_BYTES_FACTOR, _ChildWriter, _Prepared

    spec, ledger = writer.stored_spec("default"), Ledger()

    def prepared(first: int) -> _Prepared:
        return _Prepared(frame_payload([rows(ledger, first, 10)]), spec)

    size = group_nbytes([rows(Ledger(), 0, 10)])
    sink = open(os.devnull, "wb")  # its ACKD frames go nowhere; the store is what is checked
    child = _ChildWriter(writer, spec, RUN, size, sink)
    for g in range(_CHILD_BYTES_FACTOR):  # held: 0, then 1 × size: both pass
        child.enqueue(prepared(10 * g))
    blocked = threading.Thread(target=child.enqueue, args=(prepared(100),), daemon=True)
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive() and child.inbox.qsize() == _CHILD_BYTES_FACTOR
    committing = threading.Thread(target=child.run, daemon=True)
    committing.start()  # commits what waits, releasing room
    blocked.join(10)
    assert not blocked.is_alive()
    child.enqueue(None)
    committing.join(10)
    sink.close()
    assert child.error is None and len(stored(writer.path)) == 10 * (_CHILD_BYTES_FACTOR + 1)

    alone = _ChildWriter(writer, spec, RUN, 1, io.BytesIO())  # every group exceeds 2 bytes
    done = threading.Thread(target=alone.enqueue, args=(prepared(200),), daemon=True)
    done.start()
    done.join(10)
    assert not done.is_alive() and alone.inbox.qsize() == 1


def test_the_childs_transactions_grow_with_its_table(writer, tmp_path, monkeypatch):
    """The child merges past ``max_bytes`` once its table is larger than TABLE_ENTRIES_AT_MAX
    (made small here), and recomputes the limit after each commit: 20 entries stored, then six
    groups waiting → a transaction of two groups (limit 2×), then one of four (40 entries: 4×)."""
    import gpuengine.committer as committer_module
    from gpuengine.pipe_frames import read_frame
    from gpuengine.writer_process import _ChildWriter, _Prepared

    spec, ledger = writer.stored_spec("default"), Ledger()
    thread = Committer(writer, "default", RUN, ledger)
    thread.put([rows(ledger, 1000, 20)])
    thread.start()
    thread.finish()
    monkeypatch.setattr(committer_module, "TABLE_ENTRIES_AT_MAX", 10)
    size = group_nbytes([rows(Ledger(), 0, 10)])
    with open(tmp_path / "acks", "wb") as out:
        child = _ChildWriter(writer, spec, RUN, size, out)
        for g in range(6):  # within the read-ahead bound of three transactions (6 × size)
            group = [rows(ledger, 10 * g, 10)]
            child.enqueue(_Prepared(frame_payload(group), spec))
        child.enqueue(None)
        child.run()
    acks = []
    with open(tmp_path / "acks", "rb") as answers:
        while (got := read_frame(answers)) is not None:
            acks.append(got)
    assert [tag for tag, _ in acks] == [b"ACKD", b"ACKD"]
    assert [int.from_bytes(bytes(p[:4]), "little") for _, p in acks] == [2, 4]  # groups each
    assert child.error is None and len(stored(writer.path)) == 80
