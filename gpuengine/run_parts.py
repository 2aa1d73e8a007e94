"""Parts of a run: several inputs embedded in one run, each completing on its own (torch-free).

The daemon embeds many small files in one run, so their sequences share batches and the GPU
stays full; yet each file must still be done on its own: its job record committed in the
same transaction as its last embedding, then the file moved to ``done/``, without waiting
for the whole run. A :class:`RunPart` is one such input: a name, the ids its valid records
carry (no id is in two parts of a run) and their count.

The engine's :class:`PartTracker` follows every id of every part until it is *resolved*:

* **committed**: handed to a commit group, with its vectors (``embedded``) or joined to
  another id's sequence, in the same row or as an alias (``deduplicated``);
* **already stored**: the table held the id when the planner looked it up;
* **failed**: its sequence was given up (does not fit alone, non-finite values).

When a part's last id is resolved, the engine asks the caller's :class:`PartCompletion` for
the part's records (a job record), adds them to the open commit group — so they are durable
exactly when the part's last embeddings are — and, once that group is committed, tells the
caller (:meth:`PartCompletion.committed`). Every id resolves at most once, so the parts'
counts add up to the run's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

Summary = TypeVar("Summary")
SummaryIn = TypeVar("SummaryIn", contravariant=True)

INPUT_COUNTS = ("records_read", "valid_records", "invalid_skipped", "duplicate_records")
"""The input counts a part brings from its own validation (:meth:`RecordSource.counts`)."""


@dataclass(frozen=True)
class RunPart:
    """One input of a run that completes on its own (the daemon: one file of a group)."""

    name: str
    ids: frozenset[str]
    """The ids its valid records carry (it may hold more: ids of records validation
    skipped); no id is in two parts of one run."""
    records: int
    """Valid records it adds to the run's input (its ids, each once)."""
    counts: Mapping[str, int] = field(default_factory=dict)
    """Its :data:`INPUT_COUNTS`."""


@dataclass
class PartCounts:
    """What became of a part's records during the run."""

    truncated: int = 0
    already_stored: int = 0
    embedded: int = 0
    """Ids committed with the vectors of their sequence (each computed once)."""
    deduplicated: int = 0
    """Ids committed as another id's sequence (in this run or stored before)."""
    committed_records: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


class PartCompletion(Protocol[SummaryIn]):
    """The caller's side of a run's parts (the per-input form of
    :class:`~gpuengine.store.writer.CompletionRecords`). Both methods are called on the
    engine's loop thread; what they raise fails the run."""

    def records(self, part: int, summary: SummaryIn, /) -> Mapping[str, Mapping[str, Any]]:
        """Run records (by id) to commit in the transaction of ``part``'s last embeddings,
        given the part's summary at that moment."""

    def committed(self, part: int, summary: SummaryIn, /) -> None:
        """``part``'s records and embeddings are durable."""


class PartTracker(Generic[Summary]):
    """Which part each id belongs to, what became of it, and which parts are complete.
    Thread-safe: the planner's thread reports truncated and stored ids, the engine loop the
    rest."""

    def __init__(self, parts: Sequence[RunPart]):
        self.parts = list(parts)
        self.owner: dict[str, int] = {}
        for index, part in enumerate(self.parts):
            for record_id in part.ids:
                if self.owner.setdefault(record_id, index) != index:
                    raise ValueError(f"id {record_id!r} is in parts {self.owner[record_id]} "
                                     f"and {index} of one run")
        self.counts = [PartCounts() for _ in self.parts]
        self._remaining = [part.records for part in self.parts]
        self._lock = threading.Lock()
        self._truncated: set[str] = set()
        self._complete = [i for i, left in enumerate(self._remaining) if left == 0]
        self.waiting: list[tuple[int, Summary, int]] = []
        """(part, its summary, the commit group its records went into) until durable."""

    # -- what happened to ids ------------------------------------------------------------

    def observe(self, chunks: Iterable[Any]) -> Iterator[Any]:
        """Pass prepared chunks through, counting each part's truncated records."""
        owner = self.owner
        for chunk in chunks:
            flagged = chunk.truncated.nonzero()[0]
            if flagged.size:
                with self._lock:
                    for i in flagged.tolist():
                        record_id = chunk.ids[i]
                        part = owner.get(record_id)
                        if part is not None:
                            self.counts[part].truncated += 1
                            self._truncated.add(record_id)
            yield chunk

    def stored(self, ids: Iterable[str]) -> None:
        """Ids the table already held (a truncated one is not counted as truncated: as the
        run's count, that counts the records this run embeds)."""
        with self._lock:
            for record_id in ids:
                part = self.owner.get(record_id)
                if part is not None:
                    self.counts[part].already_stored += 1
                    if record_id in self._truncated:
                        self.counts[part].truncated -= 1
                    self._done_one(part)

    def committed(self, id_tuples: Iterable[Sequence[str]]) -> None:
        """Each tuple names one sequence committed with its vectors: the first id computed
        it, the others joined it."""
        owner, counts = self.owner, self.counts
        with self._lock:
            for ids in id_tuples:
                for k, record_id in enumerate(ids):
                    part = owner.get(record_id)
                    if part is None:
                        continue
                    c = counts[part]
                    c.committed_records += 1
                    if k == 0:
                        c.embedded += 1
                    else:
                        c.deduplicated += 1
                    self._done_one(part)

    def aliased(self, ids: Iterable[str]) -> None:
        """Ids committed as aliases of a sequence committed before or stored."""
        with self._lock:
            for record_id in ids:
                part = self.owner.get(record_id)
                if part is not None:
                    self.counts[part].committed_records += 1
                    self.counts[part].deduplicated += 1
                    self._done_one(part)

    def failed(self, ids: Iterable[str], reason: str) -> None:
        with self._lock:
            for record_id in ids:
                part = self.owner.get(record_id)
                if part is not None:
                    self.counts[part].failed.append((record_id, reason))
                    self._done_one(part)

    def _done_one(self, part: int) -> None:  # holding the lock
        self._remaining[part] -= 1
        if self._remaining[part] == 0:
            self._complete.append(part)

    # -- parts ----------------------------------------------------------------------------

    def take_complete(self) -> list[int]:
        """Parts completed since the last call."""
        with self._lock:
            done, self._complete = self._complete, []
            return done

    def incomplete(self) -> list[int]:
        """Parts with ids not yet resolved."""
        with self._lock:
            return [i for i, left in enumerate(self._remaining) if left > 0]

    def remaining(self, part: int) -> int:
        with self._lock:
            return self._remaining[part]

    def take_durable(self, committed_groups: int) -> list[tuple[int, Summary]]:
        """The waiting parts whose group is among the first ``committed_groups``."""
        ready = [(i, s) for i, s, group in self.waiting if group <= committed_groups]
        self.waiting = [w for w in self.waiting if w[2] > committed_groups]
        return ready


class PartLookup:
    """A table lookup for the planner that also tells the tracker which ids the table
    holds (every other question is passed on unchanged)."""

    def __init__(self, lookup: Any, tracker: PartTracker):
        self._lookup, self._tracker = lookup, tracker

    def record_digests(self, record_ids: Sequence[str]) -> list[bytes | None]:
        found = self._lookup.record_digests(record_ids)
        self._tracker.stored(rid for rid, digest in zip(record_ids, found) if digest is not None)
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lookup, name)
