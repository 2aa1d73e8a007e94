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
    planner = Planner(ledger=Ledger(), lookup=table, submit=lambda items, n_tokens: None,
                      alias=lambda pairs: None, stop=threading.Event(), expected_records=10_000)
    seen = [os.urandom(16) for _ in range(2000)]
    assert planner._stored(seen) == [False] * len(seen)
    table.stored = {seen[5], seen[700]}
    table.asked.clear()
    unseen = [os.urandom(16) for _ in range(2000)]
    digests = unseen[:1000] + seen[:1000] + unseen[1000:]
    answers = planner._stored(digests)
    assert answers == [d in table.stored for d in digests]
    assert set(seen[:1000]) <= set(table.asked)  # every digest seen before is looked up
    assert len(table.asked) < 1000 + 0.05 * len(unseen)  # and few others (false positives)
