"""Which sequences are in flight: the one structure the planner, the engine loop and the
committer share (torch-free).

The :class:`Ledger` maps each sequence digest not yet durable to the record ids waiting on
it, and holds the set of digests whose group is being committed:

1. the planner claims a digest (:meth:`Ledger.claim_columns`): a new one becomes *pending*, a
   repeat joins the pending one (computed once) or, when it is already *committing*, becomes
   an alias committed after it;
2. the engine loop moves a digest from *pending* to *committing* when its vectors are queued
   for the writer (:meth:`Ledger.to_committing_many`), or drops it when it failed;
3. the committer releases it once the transaction is durable
   (:meth:`Ledger.committed_columns`).

So an alias is never committed before its embedding, and a digest is never computed twice
by one run.

**The fast lane.** On a table that held no embedding when the run started, the planner's
digest filter knows which digests the run has never claimed: those are new, and their work
items go through the run without an entry here (their ids travel with them, as
``WorkItem.owners``). The ledger only counts them, by *generation* (:meth:`Ledger.fast_claim`:
a number the item carries as its ``lane``); a digest the filter may have seen is held back by
the planner until every generation up to its own is resolved (:meth:`Ledger.fast_drained`),
and then claimed here as above: by then a fast-lane item of the same sequence is durable (the
store answers) or failed. What is durable is reported per group as a :class:`Release`: the
ledger's digests and the fast lane's counts.
"""

from __future__ import annotations

import threading
from operator import itemgetter
from typing import Callable, Iterable, Mapping, Sequence

from gpuengine.errors import InternalError


class Release:
    """What a group's durable commit resolves: the digests the ledger holds (``digests``)
    and, per fast-lane generation, how many of its items (``counts``)."""

    __slots__ = ("digests", "counts")

    def __init__(self, digests: Sequence[bytes], counts: Mapping[int, int]):
        self.digests, self.counts = digests, counts


class Ledger:
    """Thread-safe digest → record ids for sequences not yet durable."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._pending: dict[bytes, tuple[str, ...]] = {}
        """Digest → the ids waiting on it (tuples of strings: the collector stops tracking
        them, so a long queue of sequences costs full collections nothing)."""
        self._committing: set[bytes] = set()
        self._generation = 0
        """The fast lane's open generation (:meth:`fast_claim`)."""
        self._outstanding: dict[int, int] = {}
        """Per fast-lane generation, its items neither durable nor failed yet."""
        self._failed: dict[bytes, str] = {}
        """Digest → why: fast-lane items that failed in this run."""

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

    def committed_columns(self, columns: Iterable[Sequence[bytes] | Release]) -> None:
        """A durable group's sequences, released: digest columns and :class:`Release` s
        (theirs, and their fast-lane counts)."""
        with self.lock:
            for column in columns:
                if type(column) is Release:
                    self._committing.difference_update(column.digests)
                    self._resolve(column.counts)
                else:
                    self._committing.difference_update(column)

    # -- the fast lane ---------------------------------------------------------------------
    def fast_claim(self, count: int) -> int:
        """``count`` fast-lane items claimed now: their generation (the open one)."""
        with self.lock:
            generation = self._generation
            self._outstanding[generation] = self._outstanding.get(generation, 0) + count
            return generation

    def fast_generation(self) -> int:
        """The open generation."""
        with self.lock:
            return self._generation

    def fast_close(self) -> int:
        """Close the open generation (later claims get the next); returns it."""
        with self.lock:
            self._generation += 1
            return self._generation - 1

    def fast_failed(self, generation: int, digest: bytes, reason: str) -> None:
        """A fast-lane item failed (``reason``): resolved, not durable. Its repeats held
        back by the planner fail with it (:meth:`fast_failures`)."""
        with self.lock:
            self._failed[digest] = reason
            self._resolve({generation: 1})

    def fast_failures(self, digests: Sequence[bytes]) -> list[str | None]:
        """Per digest, why its fast-lane item failed in this run; None if it did not."""
        with self.lock:
            if not self._failed:
                return [None] * len(digests)
            return list(map(self._failed.get, digests))

    def fast_drained(self, generation: int) -> bool:
        """Whether every fast-lane item of ``generation`` and earlier is durable or failed."""
        with self.lock:
            return all(g > generation for g in self._outstanding)

    def _resolve(self, counts: Mapping[int, int]) -> None:
        for generation, count in counts.items():
            left = self._outstanding.get(generation, 0) - count
            if left < 0:
                raise InternalError(f"fast-lane generation {generation}: {-left} more items "
                                    "resolved than claimed")
            if left:
                self._outstanding[generation] = left
            else:
                del self._outstanding[generation]


_first, _second = itemgetter(0), itemgetter(1)
