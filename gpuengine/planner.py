"""From valid FASTA records to work items: tokenize, resume, deduplicate (torch-free).

The planner runs on its own thread. For every record it decides one of:

* **stored** — the id is already in the table (an earlier or interrupted run): nothing to do;
* **alias** — the same sequence is already stored, committing, or waiting under another id:
  the id is attached to it and is committed with (or after) it, computed once;
* **new** — a :class:`~gpuengine.packing.WorkItem` for the scheduler.

The :class:`Ledger` is the one shared structure: digest → record ids for sequences in flight,
and the set of digests whose group is being committed. The engine moves a digest from
*pending* to *committing* when its vectors are queued for the writer, and the committer drops
it once the transaction is durable, so an alias is never committed before its embedding.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from gpuengine.packing import WorkItem
from gpuengine.records import FastaRecord
from gpuengine.store import codec

LOOKUP_CHUNK = 1024


@dataclass
class PlanCounts:
    records: int = 0
    stored: int = 0
    aliased: int = 0
    new: int = 0
    truncated: int = 0
    residues_new: int = 0
    tokens_new: int = 0


class Ledger:
    """Thread-safe digest → record ids for sequences not yet durable."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._pending: dict[bytes, list[str]] = {}
        self._committing: set[bytes] = set()

    def claim(self, digest: bytes, record_id: str, stored: bool) -> str:
        """Attach ``record_id``; returns 'pending' (joined an in-flight sequence), 'committing'
        (its group is on the way to the writer: commit as alias after it), 'stored' (alias of
        a durable embedding) or 'new' (the caller must schedule it)."""
        with self.lock:
            if digest in self._pending:
                self._pending[digest].append(record_id)
                return "pending"
            if digest in self._committing:
                return "committing"
            if stored:
                return "stored"
            self._pending[digest] = [record_id]
            return "new"

    def to_committing(self, digest: bytes) -> tuple[str, ...]:
        """The ids waiting on ``digest``; from now on it counts as committing."""
        with self.lock:
            ids = self._pending.pop(digest)
            self._committing.add(digest)
            return tuple(ids)

    def to_committing_many(self, digests: list[bytes]) -> list[tuple[str, ...]]:
        """:meth:`to_committing` for a whole batch under one lock."""
        with self.lock:
            out = [tuple(self._pending.pop(d)) for d in digests]
            self._committing.update(digests)
            return out

    def drop(self, digest: bytes) -> tuple[str, ...]:
        """Forget a pending digest (its sequence failed); returns the ids that waited on it."""
        with self.lock:
            return tuple(self._pending.pop(digest, ()))

    def committed(self, digests: Iterable[bytes]) -> None:
        with self.lock:
            self._committing.difference_update(digests)

    def pending_ids(self, digest: bytes) -> int:
        with self.lock:
            return len(self._pending.get(digest, ()))


@dataclass
class Planner:
    """Turns a record stream into scheduler submissions and alias entries."""

    tokenizer: object
    max_residues: int | None
    ledger: Ledger
    record_digests: Callable[[Sequence[str]], list[bytes | None]]
    """id → digest already stored in the table (None if absent)."""
    has_embeddings: Callable[[Sequence[bytes]], list[bool]]
    submit: Callable[[list[WorkItem]], None]
    alias: Callable[[list[tuple[bytes, str]]], None]
    """(digest, id) pairs to commit as aliases, in order after any vectors already queued."""
    stop: threading.Event
    counts: PlanCounts = field(default_factory=PlanCounts)

    def run(self, records: Iterable[FastaRecord]) -> None:
        chunk: list[FastaRecord] = []
        for record in records:
            if self.stop.is_set():
                return
            chunk.append(record)
            if len(chunk) >= LOOKUP_CHUNK:
                self._plan_chunk(chunk)
                chunk = []
        if chunk and not self.stop.is_set():
            self._plan_chunk(chunk)

    def _plan_chunk(self, records: list[FastaRecord]) -> None:
        self.counts.records += len(records)
        stored_digests = self.record_digests([r.id for r in records])
        todo = [r for r, d in zip(records, stored_digests) if d is None]
        self.counts.stored += len(records) - len(todo)
        if not todo:
            return
        embedded = [self._embedded_sequence(r) for r in todo]
        digests = [codec.sequence_digest(s) for s in embedded]
        present = self.has_embeddings(digests)
        items: list[WorkItem] = []
        aliases: list[tuple[bytes, str]] = []
        for record, seq, digest, stored in zip(todo, embedded, digests, present):
            decision = self.ledger.claim(digest, record.id, stored)
            if decision == "new":
                ids = self.tokenizer.encode(seq)
                items.append(WorkItem(digest, ids, len(seq)))
                self.counts.new += 1
                self.counts.residues_new += len(seq)
                self.counts.tokens_new += int(ids.size)
            else:
                self.counts.aliased += 1
                if decision in ("committing", "stored"):
                    aliases.append((digest, record.id))
        if items:
            self.submit(items)
        if aliases:
            self.alias(aliases)

    def _embedded_sequence(self, record: FastaRecord) -> str:
        seq = record.sequence
        if self.max_residues is not None and len(seq) > self.max_residues:
            self.counts.truncated += 1
            return seq[: self.max_residues]
        return seq
