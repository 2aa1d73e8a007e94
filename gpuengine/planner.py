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

    def claim_many(self, entries: list[tuple[bytes, str, bool]]) -> list[str]:
        """Attach each (digest, record id, stored) under one lock; per entry returns 'pending'
        (joined an in-flight sequence), 'committing' (its group is on the way to the writer:
        commit as alias after it), 'stored' (alias of a durable embedding) or 'new' (the
        caller must schedule it)."""
        with self.lock:
            pending, committing = self._pending, self._committing
            out = []
            for digest, record_id, stored in entries:
                waiting = pending.get(digest)
                if waiting is not None:
                    waiting.append(record_id)
                    out.append("pending")
                elif digest in committing:
                    out.append("committing")
                elif stored:
                    out.append("stored")
                else:
                    pending[digest] = [record_id]
                    out.append("new")
            return out

    def to_committing_many(self, digests: list[bytes]) -> list[tuple[str, ...]]:
        """The ids waiting on each digest; from now on those digests count as committing
        (one lock for a whole batch)."""
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
    fresh: bool = False
    """The table held no record id when the run started: no id can be stored yet (ids are
    unique in validated input), so the per-record id lookups are skipped."""
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
        if self.fresh:
            todo = records
        else:
            stored_digests = self.record_digests([r.id for r in records])
            todo = [r for r, d in zip(records, stored_digests) if d is None]
        self.counts.stored += len(records) - len(todo)
        if not todo:
            return
        embedded = [self._embedded_sequence(r) for r in todo]
        digests = [codec.sequence_digest(s) for s in embedded]
        present = self.has_embeddings(digests)
        new: list[tuple[bytes, str]] = []
        aliases: list[tuple[bytes, str]] = []
        decisions = self.ledger.claim_many([(d, r.id, p) for r, d, p in zip(todo, digests, present)])
        for record, seq, digest, decision in zip(todo, embedded, digests, decisions):
            if decision == "new":
                new.append((digest, seq))
            else:
                self.counts.aliased += 1
                if decision in ("committing", "stored"):
                    aliases.append((digest, record.id))
        if new:
            token_ids = self.tokenizer.encode_batch([seq for _, seq in new])
            items = [WorkItem(digest, ids, len(seq)) for (digest, seq), ids in zip(new, token_ids)]
            self.counts.new += len(items)
            self.counts.residues_new += sum(len(seq) for _, seq in new)
            self.counts.tokens_new += sum(int(ids.size) for ids in token_ids)
            self.submit(items)
        if aliases:
            self.alias(aliases)

    def _embedded_sequence(self, record: FastaRecord) -> str:
        seq = record.sequence
        if self.max_residues is not None and len(seq) > self.max_residues:
            self.counts.truncated += 1
            return seq[: self.max_residues]
        return seq
