"""The writer thread: group commit (groups waiting in its queue share one transaction, up to a
byte cap), counts and ledger release after the transaction, all-or-nothing on a failure."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from gpuengine.committer import MAX_TRANSACTION_BYTES, Committer
from gpuengine.errors import StoreMismatchError
from gpuengine.ledger import Ledger
from gpuengine.store import (
    CommitEntry,
    EmbeddingStore,
    ModelIdentity,
    OutputSpec,
    StoreWriter,
    TableSpec,
    sequence_digest,
)
from gpuengine.store.writer import CommitRows, group_counts, group_nbytes

MEAN = OutputSpec(6, "mean")
DIM = 8
RUN = "run-1"


@pytest.fixture
def writer(tmp_path: Path):
    model = ModelIdentity(family="esm2", name="esm2_t6_8M_UR50D", sha256="ab" * 32,
                          num_layers=6, embed_dim=DIM, attention_heads=4, vocab_size=33)
    with StoreWriter(tmp_path / "x.lmdb") as w:
        w.open_table(TableSpec(name="default", model=model, outputs=(MEAN,),
                               store_dtype="float32", dim=DIM, max_residues=1022))
        w.begin_run(RUN, {"command": "test"})
        yield w


def rows(ledger: Ledger, first: int, n: int) -> CommitRows:
    """Sequences S<first>..S<first+n-1>, ids r<i>, vector i: as the engine hands a batch on
    (claimed in the ledger, then moved to committing)."""
    digests = [sequence_digest(f"S{i}") for i in range(first, first + n)]
    ledger.claim_many([(d, f"r{i}") for i, d in zip(range(first, first + n), digests)],
                      lambda ds: [False] * len(ds))
    ids = ledger.to_committing_many(digests)
    return CommitRows(digests, ids, {MEAN: [np.full(DIM, i, np.float32)
                                           for i in range(first, first + n)]})


def stored(writer: StoreWriter) -> dict[str, float]:
    with EmbeddingStore(writer.path) as store:
        return {rid: float(store[rid][0]) for rid in store.ids()}


def test_waiting_groups_share_one_transaction(writer: StoreWriter) -> None:
    ledger = Ledger()
    committer = Committer(writer, "default", RUN, ledger)
    for g in range(5):  # queued before the thread starts: all five are waiting
        committer.put([rows(ledger, 10 * g, 10)])
    committer.start()
    committer.finish()
    counts = committer.snapshot()
    assert (counts.transactions, counts.groups, counts.sequences, counts.records) == (1, 5, 50, 50)
    assert counts.busy_seconds > 0
    assert stored(writer) == {f"r{i}": float(i) for i in range(50)}
    assert writer.run_record(RUN)["committed_sequences"] == 50
    assert not ledger._committing  # every digest released once durable


def test_a_transaction_merges_groups_up_to_the_byte_cap(writer: StoreWriter) -> None:
    ledger = Ledger()
    groups = [[rows(ledger, 10 * g, 10)] for g in range(5)]
    size = group_nbytes(groups[0])
    assert size == 10 * DIM * 4
    committer = Committer(writer, "default", RUN, ledger, max_bytes=2 * size)
    for group in groups:
        committer.put(group)
    committer.start()
    committer.finish()
    counts = committer.snapshot()
    assert (counts.transactions, counts.groups, counts.sequences) == (3, 5, 50)  # 2 + 2 + 1
    assert len(stored(writer)) == 50


def test_a_writer_that_keeps_up_commits_each_group_alone(writer: StoreWriter) -> None:
    ledger = Ledger()
    committer = Committer(writer, "default", RUN, ledger)
    committer.start()
    for g in range(3):
        committer.put([rows(ledger, 10 * g, 10)])
        deadline = time.monotonic() + 10
        while committer.snapshot().groups < g + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    committer.finish()
    counts = committer.snapshot()
    assert (counts.transactions, counts.groups, counts.sequences) == (3, 3, 30)


def test_later_run_records_of_merged_groups_supersede_earlier_ones(writer: StoreWriter) -> None:
    ledger = Ledger()
    committer = Committer(writer, "default", RUN, ledger)
    committer.put([rows(ledger, 0, 3)], extra_runs={"job-1": {"status": "running", "n": 1}})
    committer.put([rows(ledger, 3, 3)], extra_runs={"job-1": {"status": "complete", "n": 2}})
    committer.start()
    committer.finish()
    assert committer.snapshot().transactions == 1
    assert writer.run_record("job-1") == {"status": "complete", "n": 2}


def test_a_failing_merged_transaction_writes_none_of_its_groups(writer: StoreWriter) -> None:
    ledger = Ledger()
    writer.commit("default", [CommitEntry(sequence_digest("OTHER"), ("r12",),
                                          {MEAN: np.zeros(DIM, np.float32)})])
    committer = Committer(writer, "default", RUN, ledger)
    committer.put([rows(ledger, 0, 10)])
    committer.put([rows(ledger, 10, 10)])  # r12 names another sequence in the store
    committer.start()
    committer.finish()
    assert isinstance(committer.error, StoreMismatchError)
    assert committer.snapshot().sequences == 0
    assert stored(writer) == {"r12": 0.0}  # only what was there before
    assert writer.run_record(RUN)["committed_sequences"] == 0


def test_after_a_failure_later_groups_are_drained_unwritten(writer: StoreWriter) -> None:
    ledger = Ledger()
    writer.commit("default", [CommitEntry(sequence_digest("OTHER"), ("r2",),
                                          {MEAN: np.zeros(DIM, np.float32)})])
    committer = Committer(writer, "default", RUN, ledger)
    committer.start()
    committer.put([rows(ledger, 0, 5)])  # fails: r2
    deadline = time.monotonic() + 10
    while committer.error is None and time.monotonic() < deadline:
        time.sleep(0.005)
    committer.put([rows(ledger, 5, 5)])
    committer.finish()  # returns: the queue is drained, not blocked
    assert isinstance(committer.error, StoreMismatchError)
    assert stored(writer) == {"r2": 0.0}


def test_commit_returns_the_counts_of_its_group(writer: StoreWriter) -> None:
    ledger = Ledger()
    first = [rows(ledger, 0, 4)]
    assert writer.commit("default", first) == group_counts(first) == (4, 4)
    aliases = [CommitEntry(sequence_digest("S1"), ("alias-a", "alias-b"), None), rows(ledger, 4, 2)]
    assert writer.commit("default", aliases) == group_counts(aliases) == (2, 4)


def test_wait_idle_returns_once_every_queued_group_is_committed(writer: StoreWriter,
                                                                 monkeypatch) -> None:
    """The engine waits for this before it writes a caller's completion record (a daemon's
    job record), so that record's counts hold the groups still in the queue: with a slow
    disk (each transaction 50 ms here) the queue is not empty when the run ends."""
    ledger = Ledger()
    commit = writer.commit

    def slow_commit(*args, **kwargs):
        time.sleep(0.05)
        return commit(*args, **kwargs)

    monkeypatch.setattr(writer, "commit", slow_commit)
    committer = Committer(writer, "default", RUN, ledger, max_bytes=1)  # one group each
    committer.start()
    for g in range(4):
        committer.put([rows(ledger, 10 * g, 10)])
    assert committer.snapshot().sequences < 40
    committer.wait_idle()
    counts = committer.snapshot()
    assert (counts.transactions, counts.sequences) == (4, 40)
    committer.put([rows(ledger, 40, 5)])  # the committer is still running after the wait
    committer.finish()
    assert committer.snapshot().sequences == 45 and len(stored(writer)) == 45


def test_transactions_grow_with_the_table() -> None:
    from gpuengine.committer import GROWTH_LIMIT, TABLE_ENTRIES_AT_MAX, transaction_bytes

    cap = MAX_TRANSACTION_BYTES
    assert transaction_bytes(cap, 0) == transaction_bytes(cap, TABLE_ENTRIES_AT_MAX) == cap
    assert transaction_bytes(cap, 3 * TABLE_ENTRIES_AT_MAX) == 3 * cap == 3 << 20 << 8
    assert transaction_bytes(cap, 3_000_000) == 3_000_000 * 256  # 256 B of vectors an entry
    assert transaction_bytes(cap, 100 * TABLE_ENTRIES_AT_MAX) == GROWTH_LIMIT * cap


def test_a_large_table_merges_more_groups_a_transaction(writer: StoreWriter, monkeypatch) -> None:
    """Once the table holds more than TABLE_ENTRIES_AT_MAX entries (made small here), waiting
    groups merge past ``max_bytes``: twice the entries, twice the groups."""
    import gpuengine.committer as committer_module

    ledger = Ledger()
    first = Committer(writer, "default", RUN, ledger)
    first.put([rows(ledger, 1000, 20)])
    first.start()
    first.finish()  # the table holds 20 entries
    monkeypatch.setattr(committer_module, "TABLE_ENTRIES_AT_MAX", 10)
    groups = [[rows(ledger, 10 * g, 10)] for g in range(8)]
    committer = Committer(writer, "default", RUN, ledger, max_bytes=group_nbytes(groups[0]))
    for group in groups:
        committer.put(group)
    committer.start()
    committer.finish()
    counts = committer.snapshot()
    assert (counts.groups, counts.sequences) == (8, 80)
    assert counts.transactions == 3  # 2 groups (20 entries), then 4 (40), then the last 2
    assert len(stored(writer)) == 100
