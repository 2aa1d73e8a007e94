"""Which sequences are in flight: the one structure the planner, the engine loop and the
committer share (torch-free).

The :class:`Ledger` maps each sequence digest not yet durable to the record ids waiting on
it, and holds the set of digests whose group is being committed:

1. the planner claims a digest (:meth:`Ledger.claim_columns`): a new one becomes *pending*, a
   repeat joins the pending one (computed once) or, when it is already *committing*, becomes
   an alias committed after it;
2. the engine loop moves a digest from *pending* to *committing* when its vectors are queued
   for the writer (:meth:`Ledger.to_committing_many`), or drops it when it failed;
3. the committer releases it once the transaction is durable (:meth:`Ledger.committed`).

So an alias is never committed before its embedding, and a digest is never computed twice
by one run.
"""

from __future__ import annotations

import threading
from operator import itemgetter
from typing import Callable, Iterable, Sequence


class Ledger:
    """Thread-safe digest → record ids for sequences not yet durable."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._pending: dict[bytes, tuple[str, ...]] = {}
        """Digest → the ids waiting on it (tuples of strings: the collector stops tracking
        them, so a long queue of sequences costs full collections nothing)."""
        self._committing: set[bytes] = set()

    def claim_many(self, entries: list[tuple[bytes, str]],
                   stored: Callable[[list[bytes]], list[bool]]) -> list[str]:
        """Attach each (digest, record id); per entry returns 'pending' (joined an in-flight
        sequence), 'committing' (its group is on the way to the writer: commit as alias after
        it), 'stored' (alias of a durable embedding) or 'new' (the caller must schedule it).

        ``stored(digests)`` is asked only about digests not in flight, after they were seen
        not to be: such a digest is durable or absent, and stays so until claimed here (only
        the planner's thread claims), so the answer cannot be stale. (Asked before, a
        sequence committed in between would be computed twice.)"""
        return self.claim_columns(list(map(_first, entries)), list(map(_second, entries)), stored)

    def claim_columns(self, digests: list[bytes], ids: list[str],
                      stored: Callable[[list[bytes]], list[bool]],
                      maybe_seen: Sequence[int] | None = None) -> list[str]:
        """:meth:`claim_many` of the entries ``zip(digests, ids)``, given as the two columns
        (the planner's: no pair is made per record when every digest is new).

        ``maybe_seen``: the positions of the digests that may be in flight or stored, when
        the caller knows that the others are neither (the planner's filter of every digest
        it claimed, on a table that held no embedding when the run started): the others
        are not looked up in the ledger nor asked about. None: any may be."""
        fresh = self._claim_fresh(digests, ids, stored, maybe_seen)
        if fresh is not None:
            return fresh
        out: list[str | None] = [None] * len(digests)
        with self.lock:
            for i, (digest, record_id) in enumerate(zip(digests, ids)):
                out[i] = self._join(digest, record_id)
        unknown = [i for i, decision in enumerate(out) if decision is None]
        if unknown:
            asked = unknown if maybe_seen is None else sorted(set(unknown).intersection(maybe_seen))
            present = dict(zip(asked, stored([digests[i] for i in asked]))) if asked else {}
            with self.lock:
                for i in unknown:
                    digest, record_id = digests[i], ids[i]
                    decision = self._join(digest, record_id)  # a repeat within the entries
                    if decision is None:
                        is_stored = present.get(i, False)
                        decision = "stored" if is_stored else "new"
                        if not is_stored:
                            self._pending[digest] = (record_id,)
                    out[i] = decision
        return out  # type: ignore[return-value]

    def _claim_fresh(self, digests: list[bytes], ids: list[str],
                     stored: Callable[[list[bytes]], list[bool]],
                     maybe_seen: Sequence[int] | None) -> list[str] | None:
        """:meth:`claim_columns` when no digest is in flight or given twice (the common case:
        a chunk of distinct new sequences), decided with set operations instead of a step
        per entry, on the digests that may be in flight or stored only; None when that is
        not so (nothing changed then)."""
        distinct = set(digests)
        if len(distinct) != len(digests):
            return None
        asked = digests if maybe_seen is None else list(map(digests.__getitem__, maybe_seen))
        present: list[bool] = []
        if asked:
            with self.lock:
                if not (self._pending.keys().isdisjoint(asked)
                        and self._committing.isdisjoint(asked)):
                    return None
            # none of them can come in flight meanwhile: only the planner's thread claims
            present = stored(asked)
        with self.lock:
            if not any(present):
                self._pending.update(zip(digests, zip(ids)))
                return ["new"] * len(digests)
            out = ["new"] * len(digests)
            for i, is_stored in zip(range(len(digests)) if maybe_seen is None else maybe_seen,
                                    present):
                if is_stored:
                    out[i] = "stored"
            self._pending.update((digest, (record_id,)) for digest, record_id, decision
                                 in zip(digests, ids, out) if decision == "new")
        return out

    def _join(self, digest: bytes, record_id: str) -> str | None:
        """'pending' or 'committing' for a digest in flight (holding the lock), else None."""
        waiting = self._pending.get(digest)
        if waiting is not None:
            self._pending[digest] = (*waiting, record_id)
            return "pending"
        return "committing" if digest in self._committing else None

    def to_committing_many(self, digests: list[bytes]) -> list[tuple[str, ...]]:
        """The ids waiting on each digest; from now on those digests count as committing
        (one lock for a whole batch)."""
        with self.lock:
            out = list(map(self._pending.pop, digests))
            self._committing.update(digests)
            return out

    def drop(self, digest: bytes) -> tuple[str, ...]:
        """Forget a pending digest (its sequence failed); returns the ids that waited on it."""
        with self.lock:
            return self._pending.pop(digest, ())

    def committed(self, digests: Iterable[bytes]) -> None:
        with self.lock:
            self._committing.difference_update(digests)


_first, _second = itemgetter(0), itemgetter(1)
