"""The planner's claims on a table that held no embedding when the run started: the digest
filter decides which digests the table is asked about, and the answers land on the right
records."""

from __future__ import annotations

import os
import threading

import numpy as np

from gpuengine.ledger import Ledger
from gpuengine.planner import DigestFilter, Planner


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
                      alias=lambda pairs: None, stop=threading.Event(), expected_records=10_000)
    seen = [os.urandom(16) for _ in range(2000)]
    assert planner._claim(seen, [f"s{i}" for i in range(len(seen))]) == (None, [])
    assert table.asked == []  # none claimed before: none looked up
    ledger.to_committing_many(seen)
    ledger.committed(seen)
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
                      alias=lambda pairs: None, stop=threading.Event(), expected_records=10_000)
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
