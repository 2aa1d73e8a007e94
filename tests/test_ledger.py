"""The Ledger (gpuengine/ledger.py): which sequences are in flight, shared by the planner (claims),
the engine loop (pending -> committing, drops) and the committer (committed).

Its promise: within a run a digest is computed at most once, and every id that claims it is
handed on exactly once — with the vectors (joined while pending), as an alias after them
(while committing) or as an alias of what is stored."""

from __future__ import annotations

import queue
import random
import threading
import time

from gpuengine.ledger import Ledger


def never_stored(digests: list[bytes]) -> list[bool]:
    return [False] * len(digests)


def test_a_new_digest_is_new_and_its_repeats_join_it():
    ledger = Ledger()
    decisions = ledger.claim_many([(b"a", "a1"), (b"b", "b1"), (b"a", "a2")], never_stored)
    assert decisions == ["new", "new", "pending"]  # the repeat within one call joins too
    assert ledger.claim_many([(b"a", "a3")], never_stored) == ["pending"]
    assert ledger.to_committing_many([b"a", b"b"]) == [("a1", "a2", "a3"), ("b1",)]


def test_the_store_is_asked_only_about_digests_not_in_flight():
    ledger = Ledger()
    asked: list[list[bytes]] = []

    def stored(digests):
        asked.append(list(digests))
        return [d == b"old" for d in digests]

    ledger.claim_many([(b"a", "a1")], stored)
    decisions = ledger.claim_many([(b"a", "a2"), (b"old", "o1"), (b"c", "c1")], stored)
    assert decisions == ["pending", "stored", "new"]
    assert asked == [[b"a"], [b"old", b"c"]]  # b"a" was in flight the second time


def test_a_committing_digest_gets_aliases_until_it_is_committed():
    ledger = Ledger()
    ledger.claim_many([(b"a", "a1")], never_stored)
    assert ledger.to_committing_many([b"a"]) == [("a1",)]
    assert ledger.claim_many([(b"a", "a2")], never_stored) == ["committing"]
    ledger.committed([b"a"])
    # durable now: the store answers
    assert ledger.claim_many([(b"a", "a3")], lambda ds: [True] * len(ds)) == ["stored"]


def test_a_dropped_digest_returns_its_ids_and_may_be_claimed_again():
    ledger = Ledger()
    ledger.claim_many([(b"a", "a1"), (b"a", "a2")], never_stored)
    assert ledger.drop(b"a") == ("a1", "a2")
    assert ledger.drop(b"a") == ()
    assert ledger.claim_many([(b"a", "a3")], never_stored) == ["new"]


def test_concurrent_planner_loop_and_committer_compute_each_digest_once():
    """The three threads of a run at once: the planner claims every digest many times in
    random order while the loop moves new ones to committing and the committer makes them
    durable. Each digest is 'new' once, and every id is handed on exactly once."""
    ledger = Ledger()
    store: set[bytes] = set()
    store_lock = threading.Lock()
    digests = [bytes([i % 256, i // 256]) for i in range(400)]
    claims = [(d, f"{d.hex()}-{k}") for d in digests for k in range(5)]
    random.Random(3).shuffle(claims)
    handed: list[str] = []  # every id, as the run would write it
    new: "queue.Queue[bytes | None]" = queue.Queue()
    to_commit: "queue.Queue[bytes | None]" = queue.Queue()

    def stored(ds):
        with store_lock:
            return [d in store for d in ds]

    def loop():
        while (digest := new.get()) is not None:
            (ids,) = ledger.to_committing_many([digest])
            handed.extend(ids)
            to_commit.put(digest)
        to_commit.put(None)

    def committer():
        while (digest := to_commit.get()) is not None:
            time.sleep(0.0005)  # the transaction: claims meanwhile find the digest committing
            with store_lock:
                store.add(digest)
            ledger.committed([digest])

    threads = [threading.Thread(target=loop), threading.Thread(target=committer)]
    for thread in threads:
        thread.start()
    news: list[bytes] = []
    for start in range(0, len(claims), 7):
        chunk = claims[start:start + 7]
        time.sleep(0.0002)  # reading the next chunk: the other threads move on meanwhile
        for (digest, record_id), decision in zip(chunk, ledger.claim_many(chunk, stored)):
            if decision == "new":
                news.append(digest)
                new.put(digest)
            elif decision in ("committing", "stored"):
                handed.append(record_id)  # an alias of what is (being) committed
    new.put(None)
    for thread in threads:
        thread.join(30)
    assert sorted(news) == sorted(digests)  # each computed once
    assert sorted(handed) == sorted(record_id for _, record_id in claims)  # each id once


def test_digests_outside_maybe_seen_are_new_without_a_question():
    """With ``maybe_seen`` the store is asked only about those positions (not in flight);
    the other digests are new, in the fresh path and in the one with repeats alike."""
    ledger = Ledger()
    asked: list[list[bytes]] = []

    def stored(digests):
        asked.append(list(digests))
        return [d == b"old" for d in digests]

    ledger.claim_columns([b"a"], ["a1"], stored, maybe_seen=[])
    assert asked == []
    decisions = ledger.claim_columns([b"b", b"old", b"c"], ["b1", "o1", "c1"], stored,
                                     maybe_seen=[1])
    assert decisions == ["new", "stored", "new"] and asked == [[b"old"]]
    asked.clear()
    decisions = ledger.claim_columns([b"d", b"a", b"old", b"d", b"e"],
                                     ["d1", "a2", "o2", "d2", "e1"], stored, maybe_seen=[1, 2])
    assert decisions == ["new", "pending", "stored", "pending", "new"]
    assert asked == [[b"old"]]  # b"a" was in flight, b"d" and b"e" outside maybe_seen
    assert ledger.to_committing_many([b"a", b"b", b"c", b"d", b"e"]) == [
        ("a1", "a2"), ("b1",), ("c1",), ("d1", "d2"), ("e1",)]
