"""The planner's claims on a table that held no embedding when the run started: the digest
filter decides which digests the table is asked about, and the answers land on the right
records."""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from types import SimpleNamespace

import numpy as np

from gpuengine import inputs
from gpuengine.engine import _Run
from gpuengine.ledger import Ledger
from gpuengine import planner as planner_module
from gpuengine.packing import LEDGER, ItemBlock
from gpuengine.planner import DigestFilter, Planner
from gpuengine.scheduler import Scheduler
from gpuengine.store.codec import sequence_digest
from gpuengine.tokenization import EsmTokenizer

from conftest import random_proteins


def test_maybe_then_add_is_maybe_many_then_add_many():
    first, second = [os.urandom(16) for _ in range(3000)], [os.urandom(16) for _ in range(3000)]
    one, other = DigestFilter(4000), DigestFilter(4000)
    for digests in (first, second, first[:100] + second[:100]):
        maybe = one.maybe_many(digests)
        one.add_many(digests)
        assert other.maybe_then_add(digests).tolist() == maybe
    assert np.array_equal(one._bytes, other._bytes)


class _EmptyTable:
    """A table lookup of a table with no record and no embedding yet, whose
    ``has_embeddings`` says yes for the digests in ``stored`` (as if committed meanwhile)."""

    def __init__(self) -> None:
        self.stored: set[bytes] = set()
        self.asked: list[bytes] = []

    def record_count(self) -> int:
        return 0

    def embedding_count(self) -> int:
        return 0

    def has_embeddings(self, digests):
        self.asked.extend(digests)
        return [d in self.stored for d in digests]


def test_only_digests_seen_before_are_looked_up_and_each_answer_is_its_own():
    table = _EmptyTable()
    ledger = Ledger()
    planner = Planner(ledger=ledger, lookup=table, submit=lambda items, n_tokens: None,
                      alias=lambda pairs: None, fail=lambda pairs: None, stop=threading.Event(),
                      expected_records=10_000)
    seen = [os.urandom(16) for _ in range(2000)]
    assert planner._claim(seen, [f"s{i}" for i in range(len(seen))]) == (None, [])
    assert table.asked == []  # none claimed before: none looked up
    ledger.to_committing_many(seen)
    ledger.committed_columns([seen])
    table.stored = {seen[5], seen[700]}
    unseen = [os.urandom(16) for _ in range(2000)]
    digests = unseen[:1000] + seen[:1000] + unseen[1000:]
    ids = [f"r{i}" for i in range(len(digests))]
    new, aliases = planner._claim(digests, ids)
    stored_at = [i for i, d in enumerate(digests) if d in table.stored]
    assert new == [i for i in range(len(digests)) if i not in stored_at]
    assert aliases == [(digests[i], ids[i]) for i in stored_at]
    assert set(seen[:1000]) <= set(table.asked)  # every digest seen before is looked up
    assert len(table.asked) < 1000 + 0.05 * len(unseen)  # and few others (false positives)


def test_a_repeat_of_a_digest_in_flight_joins_it_with_the_filter():
    """Digests the filter has seen are looked up in the ledger: a repeat of one pending
    joins it, of one committing becomes an alias; a repeat within the chunk joins the first."""
    table = _EmptyTable()
    ledger = Ledger()
    planner = Planner(ledger=ledger, lookup=table, submit=lambda items, n_tokens: None,
                      alias=lambda pairs: None, fail=lambda pairs: None, stop=threading.Event(),
                      expected_records=10_000)
    pending, committing = os.urandom(16), os.urandom(16)
    assert planner._claim([pending, committing], ["p1", "c1"]) == (None, [])
    ledger.to_committing_many([committing])
    fresh = [os.urandom(16) for _ in range(500)]
    digests = [*fresh[:200], pending, *fresh[200:], committing, fresh[3]]
    ids = [f"r{i}" for i in range(len(digests))]
    new, aliases = planner._claim(digests, ids)
    assert new == list(range(200)) + list(range(201, 501))  # all fresh ones, once
    assert aliases == [(committing, "r501")]
    assert ledger.to_committing_many([pending, fresh[3]]) == [("p1", "r200"), ("r3", "r502")]


def test_suspects_are_the_digests_maybe_seen_and_the_later_repeats_within_a_chunk():
    seen, fresh = [os.urandom(16) for _ in range(500)], [os.urandom(16) for _ in range(500)]
    claimed = DigestFilter(100_000)  # large: no false positive among 500 in practice
    assert not claimed.suspects(seen).any()
    digests = [fresh[0], seen[3], fresh[1], fresh[0], fresh[2], fresh[1], fresh[0]]
    assert claimed.suspects(digests).tolist() == [False, True, False, True, False, True, True]


class _DurableTable(_EmptyTable):
    """An empty table whose ``has_embeddings`` answers for what the test's committer made
    durable (thread-safe)."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def has_embeddings(self, digests):
        with self.lock:
            return [d in self.stored for d in digests]


def test_the_fast_lane_computes_each_digest_once_and_hands_on_each_id_once(monkeypatch):
    """The planner (its own thread), a scheduler, an engine loop and a committer at once, on
    a table that started empty, with repeats within chunks, across them and of sequences in
    every state (queued, committing, durable), and small generations mixed in the
    scheduler's sorted windows: each sequence is computed once, and every id is handed on
    exactly once (with its vectors or as an alias)."""
    monkeypatch.setattr(planner_module, "GENERATION_ITEMS", 40)
    rng = random.Random(11)
    pool = random_proteins([rng.randint(5, 60) for _ in range(700)], seed=12)
    seqs = [rng.choice(pool) if rng.random() < 0.4 else p for p in pool for _ in range(3)]
    rng.shuffle(seqs)
    ids = [f"r{i}" for i in range(len(seqs))]
    tok = EsmTokenizer()
    chunks = [inputs.prepare_lists(ids[i:i + 64], seqs[i:i + 64], tok, 100)
              for i in range(0, len(seqs), 64)]
    ledger, table, scheduler = Ledger(), _DurableTable(), Scheduler(window=300)
    durable: "queue.Queue[tuple | None]" = queue.Queue()
    handed: list[str] = []
    computed: list[bytes] = []
    aliases: list[tuple[bytes, str]] = []
    planner = Planner(ledger=ledger, lookup=table, submit=scheduler.submit,
                      alias=aliases.extend, fail=lambda pairs: None, stop=threading.Event(),
                      expected_records=len(seqs))
    assert planner.claimed is not None
    loop = SimpleNamespace(ledger=ledger)
    mixed: list[int] = []

    def plan():
        planner.run(chunks)
        scheduler.close()

    def engine_loop():
        while True:
            batch = scheduler.next_batch(0, 400, timeout=0.01)
            if batch is None:
                if scheduler.finished:
                    break
                continue
            scheduler.complete(batch.batch_id)
            block = batch.block
            mixed.append(len(set(block.lanes)))
            owners, release = _Run._to_committing(loop, block)
            handed.extend(rid for group in owners for rid in group)
            computed.extend(block.digests)
            durable.put((block.digests, release))
        durable.put(None)

    def committer():
        while (got := durable.get()) is not None:
            digests, release = got
            time.sleep(rng.random() * 0.002)  # the transaction: claims meanwhile
            with table.lock:
                table.stored.update(digests)
            ledger.committed_columns([digests if release is None else release])

    threads = [threading.Thread(target=f, daemon=True) for f in (plan, engine_loop, committer)]
    for thread in threads:
        thread.start()
    threads[0].join(60)
    planner.stop.set()  # a bug (a thread that died) fails the test instead of hanging it
    scheduler.close()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    handed.extend(rid for _, rid in aliases)
    assert sorted(computed) == sorted(set(map(sequence_digest, seqs)))  # each once
    assert sorted(handed) == sorted(ids)  # each id once
    by_id = dict(zip(ids, map(sequence_digest, seqs)))
    assert all(by_id[rid] == digest for digest, rid in aliases)
    assert planner.counts.new == len(computed)
    assert planner.counts.aliased == len(seqs) - len(computed)
    assert ledger.fast_drained(ledger.fast_generation()) and not ledger._committing
    assert max(mixed) >= 3  # batches held several generations (and the ledger's lane)


def test_a_batchs_ids_and_release_by_lane():
    """The engine loop's ids for a batch: the fast lane's from the items, the ledger's moved
    to committing; the release counts each generation once, whatever the order."""
    ledger = Ledger()
    assert ledger.claim_many([(b"a" * 16, "a1"), (b"a" * 16, "a2")], never_stored) == [
        "new", "pending"]
    first = ledger.fast_claim(2)
    ledger.fast_close()
    second = ledger.fast_claim(1)
    block = ItemBlock([b"x" * 16, b"a" * 16, b"y" * 16, b"z" * 16], [b""] * 4, [1] * 4,
                      [3] * 4, (), [("x1",), (), ("y1",), ("z1",)], [second, LEDGER, first, first])
    ids, release = _Run._to_committing(SimpleNamespace(ledger=ledger), block)
    assert ids == [("x1",), ("a1", "a2"), ("y1",), ("z1",)]
    assert release.digests == [b"a" * 16] and dict(release.counts) == {first: 2, second: 1}
    fast = block.take([0, 2, 3])  # the fast lane alone, the first item of the later one
    ids, release = _Run._to_committing(SimpleNamespace(ledger=ledger), fast)
    assert ids == [("x1",), ("y1",), ("z1",)]
    assert release.digests == () and dict(release.counts) == {first: 2, second: 1}


def never_stored(digests):
    return [False] * len(digests)
