"""A run split into parts (the daemon's small files, :mod:`gpuengine.run_parts`): each part's
records are committed in the transaction of its last embeddings, the caller hears once they
are durable (while the run goes on), and the parts' counts add up to the run's. The model is
replaced by a paced counting runner (vectors derived from the digest) so that every
computation and every transaction can be checked."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import random_proteins
from digest_runner import DigestRunner
from gpuengine.config import EmbedConfig
from gpuengine.engine import run_embed
from gpuengine.inputs import RecordSource
from gpuengine.records import FastaRecord
from gpuengine.run_parts import PartTracker, RunPart
from gpuengine.store.writer import CommitRows, StoreWriter


def _parts(n_parts=4, per_part=30):
    """Part k's sequences have lengths in a band of its own (the scheduler sorts by length,
    so parts complete in order); the last part repeats the first part's sequences under
    other ids (computed once, across parts)."""
    parts = []
    for k in range(n_parts - 1):
        seqs = random_proteins([6 + 12 * k + i % 10 for i in range(per_part)], seed=20 + k)
        parts.append([(f"p{k}_{i}", s) for i, s in enumerate(seqs)])
    parts.append([(f"copy_{i}", s) for i, (_, s) in enumerate(parts[0])])
    return parts


def _source(parts):
    records = [r for part in parts for r in part]

    def iterate():
        for i, (rid, seq) in enumerate(records):
            yield FastaRecord(rid, seq, "mem", i + 1, i)

    return RecordSource(iterate, len(records), sum(len(s) for _, s in records))


def _run_parts(tmp_path, parts, completion, stop=None, computed=None, runner=None, **kw):
    fasta = tmp_path / "names-the-run.fa"
    fasta.touch()
    config = EmbedConfig(inputs=(fasta,), model=str(kw.pop("model")), out=tmp_path / "s.lmdb",
                         max_tokens=kw.pop("max_tokens", 96), commit_every=4)
    computed = [] if computed is None else computed
    make = runner or (lambda d, p, o: DigestRunner(o, computed, pace=0.005))
    run_parts = [RunPart(f"part{k}", frozenset(r for r, _ in part), len(part),
                         {"records_read": len(part), "valid_records": len(part)})
                 for k, part in enumerate(parts)]
    return run_embed(config, stop=stop, records=_source(parts),
                     runner_factory=make, parts=run_parts, part_completion=completion)


class Completion:
    """Records each part's summary, and when it heard what."""

    def __init__(self, transactions: list, stop: threading.Event | None = None):
        self.transactions = transactions
        self.stop = stop
        """Set once the first part is durable (a stop request part way through the run)."""
        self.summaries: dict[int, object] = {}
        self.durable: list[tuple[int, int]] = []
        """(part, transactions committed when the engine said it was durable)."""
        self.thread = None

    def records(self, part, summary):
        self.summaries[part] = summary
        return {f"job-{part}": {"run_id": f"job-{part}", "status": "complete",
                                "counts": {"committed_records": summary.committed_records}}}

    def committed(self, part, summary):
        self.thread = threading.current_thread()
        self.durable.append((part, len(self.transactions)))
        if self.stop is not None:
            self.stop.set()


@pytest.fixture
def transactions(monkeypatch):
    """Each transaction of the store: (record ids it maps, run records it writes)."""
    log: list[tuple[set[str], set[str]]] = []
    real = StoreWriter.commit

    def commit(self, table, entries, *, run_id=None, extra_runs=None):
        ids = set()
        for part in entries:
            for record_ids in (part.record_ids if type(part) is CommitRows else [part.record_ids]):
                ids.update(record_ids)
        result = real(self, table, entries, run_id=run_id, extra_runs=extra_runs)
        log.append((ids, set(extra_runs or ())))
        return result

    monkeypatch.setattr(StoreWriter, "commit", commit)
    return log


def test_each_part_is_committed_with_its_last_embeddings_and_announced_when_durable(
        tiny_pt, tmp_path, transactions):
    parts = _parts()
    completion = Completion(transactions)
    computed: list[bytes] = []
    summary = _run_parts(tmp_path, parts, completion, computed=computed, model=tiny_pt)
    assert summary.exit_code == 0 and summary.committed_records == sum(map(len, parts))
    assert len(computed) == len(set(computed)) == summary.embedded == 90  # copies: once
    assert sorted(p for p, _ in completion.durable) == [0, 1, 2, 3]
    assert completion.thread is threading.main_thread()  # the caller's (the loop's) thread
    for k, part in enumerate(parts):
        ids = {rid for rid, _ in part}
        [where] = [t for t, (_, runs) in enumerate(transactions) if f"job-{k}" in runs]
        assert ids & transactions[where][0], f"part {k}'s record came without its embeddings"
        assert not any(ids & later for later, _ in transactions[where + 1:])
        heard = dict(completion.durable)[k]
        assert heard > where  # announced only once that transaction was committed
    first_heard = min(heard for _, heard in completion.durable)
    assert first_heard < len(transactions), "no part finished before the run's last commit"
    # the parts' counts are their own and add up to the run's
    s = completion.summaries
    assert [s[k].committed_records for k in range(4)] == [30, 30, 30, 30]
    assert s[3].deduplicated == 30 and s[3].embedded == 0 and s[0].embedded == 30
    for field in ("committed_records", "embedded", "deduplicated", "already_stored"):
        assert sum(getattr(s[k], field) for k in range(4)) == getattr(summary, field), field
    assert s[0].group["parts"] == 4 and s[0].records_read == 30


def test_a_stopped_run_announces_the_parts_it_finished_and_a_rerun_the_rest(
        tiny_pt, tmp_path, transactions):
    parts = _parts()
    stop = threading.Event()
    first = Completion(transactions, stop=stop)
    partial = _run_parts(tmp_path, parts, first, stop=stop, model=tiny_pt)
    assert partial.interrupted
    finished = {p for p, _ in first.durable}
    assert finished != {0, 1, 2, 3}
    rest = Completion(transactions)
    resumed = _run_parts(tmp_path, parts, rest, model=tiny_pt)
    assert resumed.exit_code == 0 and {p for p, _ in rest.durable} == {0, 1, 2, 3}
    stored = sum(rest.summaries[k].already_stored for k in range(4))
    assert stored == resumed.already_stored == partial.committed_records > 0
    for k in range(4):
        s = rest.summaries[k]
        assert s.committed_records + s.already_stored == 30


def test_a_failed_sequence_is_listed_in_its_part_which_still_completes(tiny_pt, tmp_path,
                                                                      transactions):
    from gpuengine.store.codec import sequence_digest

    parts = _parts()
    bad = sequence_digest(parts[1][4][1])

    class NonFinite(DigestRunner):
        def finish(self, items):
            result = super().finish(items)
            result.finite = np.array([item.digest != bad for item in items])
            return result

    completion = Completion(transactions)
    summary = _run_parts(tmp_path, parts, completion, model=tiny_pt,
                         runner=lambda d, p, o: NonFinite(o, [], pace=0.005))
    assert summary.exit_code == 3 and [rid for rid, _ in summary.failed] == ["p1_4"]
    part = completion.summaries[1]
    assert [rid for rid, _ in part.failed] == ["p1_4"] and part.committed_records == 29
    assert sorted(p for p, _ in completion.durable) == [0, 1, 2, 3]


def test_tracker_rules():
    with pytest.raises(ValueError, match="in parts 0 and 1"):
        PartTracker([RunPart("a", frozenset({"x"}), 1), RunPart("b", frozenset({"x"}), 1)])
    tracker = PartTracker([RunPart("a", frozenset({"x", "y"}), 2), RunPart("empty",
                                                                             frozenset(), 0)])
    assert tracker.take_complete() == [1]  # nothing to wait for
    tracker.committed([("x", "y")])
    assert tracker.take_complete() == [0] and tracker.incomplete() == []
    assert (tracker.counts[0].embedded, tracker.counts[0].deduplicated) == (1, 1)
    tracker.committed([("unknown",)])  # an id of no part is ignored
    assert tracker.counts[0].committed_records == 2
