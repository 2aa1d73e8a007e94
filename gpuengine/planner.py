"""From prepared chunks of valid records to work items: resume, deduplicate (torch-free).

The planner runs on its own thread. For every record it decides one of:

* **stored** — the id is already in the table (an earlier or interrupted run): nothing to do;
* **alias** — the same sequence is already stored, committing, or waiting under another id:
  the id is attached to it and is committed with (or after) it, computed once;
* **new** — a work item for the scheduler (a chunk's new items go as one
  :class:`~gpuengine.packing.ItemBlock`).

On a table that held no embedding when the run started, a digest the planner's
:class:`DigestFilter` has never seen is new without a question to the ledger or the table:
its item goes in the ledger's *fast lane* (:mod:`gpuengine.ledger`), carrying its id, and the
ledger only counts it. A digest the filter may have seen (a repeat, or a false positive of the
filter: at most 0.3 %) is a *suspect*: it waits, its item made, until every fast-lane item claimed
before it is durable or failed, and is then decided as above (the table then answers for its
fast-lane twin).

Whether a sequence is in flight is the :class:`~gpuengine.ledger.Ledger`'s to say; whether it
is stored, the table's :class:`~gpuengine.store.lookup.TableLookup`'s.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from gpuengine.inputs import PreparedChunk, StopFlag
from gpuengine.ledger import Ledger
from gpuengine.packing import TOKEN_DTYPE, ItemBlock
from gpuengine.store.lookup import TableLookup



GENERATION_ITEMS = 16_384
"""Fast-lane items a generation holds before the planner closes it (a suspect waits for its
generation to be closed and resolved: about this many items, then their commit)."""

SUSPECT_POLL_SECONDS = 0.005
"""How often the planner, at the end of its input, looks whether its suspects may be decided."""


@dataclass
class PlanCounts:
    records: int = 0
    stored: int = 0
    aliased: int = 0
    new: int = 0
    truncated: int = 0
    residues_new: int = 0
    tokens_new: int = 0


class DigestFilter:
    """Bloom filter of sequence digests (blake2b output: uniformly random, so three 32-bit
    words of a digest are its three bit positions). :meth:`maybe_many` is False only for a
    digest never added; 16 to 32 bits per expected digest (4 MiB for 2 M reads, 256 MiB for
    100 M) give at most about 0.3 % false positives (each costs the fast lane a wait)."""

    def __init__(self, capacity: int) -> None:
        bits = 1 << min(32, max(16, (16 * capacity).bit_length()))
        self._mask = np.uint32(bits - 1)
        self._bytes = np.zeros(bits // 8, np.uint8)

    def _positions(self, digests: Sequence[bytes]) -> np.ndarray:
        words = np.frombuffer(b"".join(digests), dtype="<u4").reshape(len(digests), 4)
        return words[:, :3] & self._mask

    def maybe_many(self, digests: Sequence[bytes]) -> list[bool]:
        pos = self._positions(digests)
        return ((self._bytes[pos >> 3] >> (pos & 7).astype(np.uint8)) & 1).all(axis=1).tolist()

    def suspects(self, digests: Sequence[bytes]) -> np.ndarray:
        """A bool array: True for each digest :meth:`maybe_then_add` may have seen, and for
        each that repeats an earlier one of ``digests`` (by its first 8 bytes: a rare false
        repeat only costs a wait); then adds them all. The others are new to the filter."""
        suspect = self.maybe_then_add(digests)
        first = np.frombuffer(b"".join(digests), dtype="<u8")[::2]
        ordered = np.sort(first)
        if len(ordered) > 1 and (ordered[1:] == ordered[:-1]).any():
            repeat = np.ones(len(first), bool)
            repeat[np.unique(first, return_index=True)[1]] = False
            suspect |= repeat
        return suspect

    def maybe_then_add(self, digests: Sequence[bytes]) -> np.ndarray:
        """:meth:`maybe_many` (as a bool array) and then :meth:`add_many`, the bit positions
        found once."""
        pos = self._positions(digests)
        byte, bit = pos >> 3, (pos & 7).astype(np.uint8)
        maybe = ((self._bytes[byte] >> bit) & 1).all(axis=1)
        np.bitwise_or.at(self._bytes, byte.ravel(), np.left_shift(1, bit.ravel()).astype(np.uint8))
        return maybe

    def add_many(self, digests: Sequence[bytes]) -> None:
        pos = self._positions(digests).ravel()
        np.bitwise_or.at(self._bytes, pos >> 3, np.left_shift(1, pos & 7).astype(np.uint8))


@dataclass
class Planner:
    """Turns prepared chunks into scheduler submissions and alias entries."""

    ledger: Ledger
    lookup: TableLookup
    """The table the run adds to: which ids are stored, which sequences have embeddings."""
    submit: Callable[[ItemBlock, np.ndarray], None]
    """New work items and their token counts (``Scheduler.submit``)."""
    alias: Callable[[list[tuple[bytes, str]]], None]
    """(digest, id) pairs to commit as aliases, in order after any vectors already queued."""
    fail: Callable[[list[tuple[str, str]]], None]
    """(id, reason) pairs of records whose sequence failed in this run (a fast-lane repeat
    whose twin failed while it waited)."""
    stop: StopFlag
    expected_records: int = 0
    """Records the run will plan (sizes :attr:`claimed`)."""
    fresh: bool = field(init=False)
    """The table held no record id when the run started: no id can be stored yet (ids are
    unique in validated input), so the per-record id lookups are skipped."""
    claimed: DigestFilter | None = field(init=False)
    """Only when the table held no embedding when the run started: every digest this run
    has claimed. Only this run's commits add embeddings then, so a digest the filter has
    never seen is neither in flight nor stored, and only the others are looked up in the
    ledger and the table. (Another process filling the same table at the same time may
    then see a sequence computed twice, as it already could between a lookup and the
    commit; no id is lost or mapped twice.)"""
    counts: PlanCounts = field(default_factory=PlanCounts)
    _suspects: deque[tuple[int, ItemBlock, np.ndarray, list[str]]] = field(
        init=False, default_factory=deque)
    """Fast-lane suspects waiting (:meth:`_plan_fast`): the generation they wait for, their
    items, token counts and ids."""
    _generation_items: int = field(init=False, default=0)
    """Fast-lane items claimed in the ledger's open generation."""

    def __post_init__(self) -> None:
        self.fresh = self.lookup.record_count() == 0
        self.claimed = (DigestFilter(self.expected_records) if self.lookup.embedding_count() == 0
                        else None)

    def run(self, chunks: Iterable[PreparedChunk]) -> None:
        """Plan every chunk (already read, truncated, hashed and tokenized: see
        :mod:`gpuengine.inputs`), in order, until the chunks end or ``stop`` is set; then
        the suspects still waiting (:meth:`_plan_fast`)."""
        for chunk in chunks:
            if self.stop.is_set():
                return
            self._plan_chunk(chunk)
            self._decide_suspects()
        if self._suspects:
            self.ledger.fast_close()
        while self._suspects and not self.stop.is_set():
            if not self._decide_suspects():
                time.sleep(SUSPECT_POLL_SECONDS)

    def _plan_chunk(self, chunk: PreparedChunk) -> None:
        todo = self._unstored(chunk.ids)
        if not len(todo):
            return
        every = len(todo) == len(chunk.ids)
        truncated = chunk.truncated if every else chunk.truncated[todo]
        self.counts.truncated += int(np.count_nonzero(truncated))
        digests = chunk.digests if every else [chunk.digests[i] for i in todo]
        ids = chunk.ids if every else [chunk.ids[i] for i in todo]
        rows = np.arange(len(chunk.ids)) if every else np.asarray(todo, np.int64)
        if self.claimed is not None:
            return self._plan_fast(chunk, rows, digests, ids)
        new, aliases = self._claim(digests, ids)
        if new is not None:  # else every record is new: no per-record choice
            rows, digests = rows[new], [digests[j] for j in new]
        self._hand_over(*self._items(chunk, rows, digests), aliases)

    def _plan_fast(self, chunk: PreparedChunk, rows: np.ndarray, digests: list[bytes],
                   ids: list[str]) -> None:
        """The fast lane (a table that started empty): the digests the filter has never
        seen are new, claimed in the ledger's open generation by their count only, and
        their items carry their ids; the others (suspects) wait, their items made, until
        that generation and every earlier one is resolved (:meth:`_decide_suspects`)."""
        suspect = self.claimed.suspects(digests)
        held = np.flatnonzero(suspect)
        waiting = None
        if len(held):
            at = held.tolist()
            waiting = (*self._items(chunk, rows[held], list(map(digests.__getitem__, at))),
                       list(map(ids.__getitem__, at)))
            fast = np.flatnonzero(~suspect)
            at = fast.tolist()
            rows = rows[fast]
            digests, ids = list(map(digests.__getitem__, at)), list(map(ids.__getitem__, at))
        if digests:
            generation = self.ledger.fast_claim(len(digests))
            self._generation_items += len(digests)
            block, sizes = self._items(chunk, rows, digests, list(zip(ids)),
                                       [generation] * len(digests))
            self._hand_over(block, sizes, [])
        if waiting is not None:  # after every fast-lane item so far, this chunk's included
            self._suspects.append((self._last_generation(), *waiting))
        if self._generation_items >= GENERATION_ITEMS:
            self.ledger.fast_close()
            self._generation_items = 0

    def _last_generation(self) -> int:
        """The newest generation with fast-lane items claimed (the open one, or the one
        before it when the open one has none yet)."""
        return self.ledger.fast_generation() - (0 if self._generation_items else 1)

    def _decide_suspects(self) -> bool:
        """Decide the suspects whose generations are resolved (the ledger and the table
        now know their fast-lane twins, if any); whether any was."""
        decided = False
        while self._suspects and self.ledger.fast_drained(self._suspects[0][0]):
            _, items, sizes, ids = self._suspects.popleft()
            reasons = self.ledger.fast_failures(items.digests)
            if any(reasons):  # their twins failed: so do they, as repeats of them
                self.counts.aliased += len(reasons) - reasons.count(None)
                self.fail([(i, r) for i, r in zip(ids, reasons) if r is not None])
                keep = [j for j, r in enumerate(reasons) if r is None]
                items, sizes, ids = items.take(keep), sizes[keep], [ids[j] for j in keep]
            new, aliases = self._claim(items.digests, ids, suspects=True)
            if new is not None:
                items, sizes = items.take(new), sizes[new]
            self._hand_over(items, sizes, aliases)
            decided = True
        return decided

    def _items(self, chunk: PreparedChunk, rows: np.ndarray, digests: list[bytes],
               owners: list[tuple[str]] | None = None,
               lanes: list[int] | None = None) -> tuple[ItemBlock, np.ndarray]:
        """Work items of the chunk's records at ``rows`` (with their ``digests``, and, in
        the fast lane, their ``owners`` and ``lanes``), as one block, and their token
        counts: slices of one ``bytes`` copy of the chunk's token buffer, built column-wise
        (one comprehension of slices: the interpreter's own slice objects come from its
        one-slice cache, where ``map(slice, ...)`` allocates and tracks one per item, 70
        against 110 ns an item)."""
        ends = chunk.ends[rows]
        starts = ends - np.diff(chunk.ends, prepend=0)[rows]
        sizes, residues = ends - starts, chunk.residues[rows]
        tokens = chunk.tokens.astype(TOKEN_DTYPE, copy=False).tobytes()
        width = TOKEN_DTYPE.itemsize
        slices = [tokens[start:end] for start, end in zip((starts * width).tolist(),
                                                          (ends * width).tolist())]
        keys: tuple[list[bytes], ...] = ()
        if chunk.embedding_keys:  # per output, each item's key
            if len(rows) == len(chunk.ids):
                keys = tuple(map(list, chunk.embedding_keys))
            else:
                at = rows.tolist()
                keys = tuple(list(map(column.__getitem__, at)) for column in chunk.embedding_keys)
        block = ItemBlock(list(digests), slices, residues.tolist(), sizes.tolist(), keys,
                          owners, lanes)
        return block, sizes

    def _unstored(self, ids: Sequence[str]) -> Sequence[int]:
        """Positions of the records whose id the table does not hold yet (all of them on a
        fresh table); counts the records and the ones already stored."""
        self.counts.records += len(ids)
        if self.fresh:
            return range(len(ids))
        stored = self.lookup.record_digests(ids)
        todo = [i for i, d in enumerate(stored) if d is None]
        self.counts.stored += len(ids) - len(todo)
        return todo

    def _claim(self, digests: list[bytes], ids: list[str], suspects: bool = False,
               ) -> tuple[list[int] | None, list[tuple[bytes, str]]]:
        """The ledger's decision for each (digest, id): positions to compute (None: all of
        them), and the aliases of sequences being committed or already stored (others wait
        for an earlier claim). ``suspects``: fast-lane suspects, already in the filter."""
        maybe_seen = None
        if self.claimed is not None and not suspects:  # the chunk's digests are claimed now
            maybe_seen = np.flatnonzero(self.claimed.maybe_then_add(digests)).tolist()
        decisions = self.ledger.claim_columns(digests, ids, self.lookup.has_embeddings,
                                              maybe_seen)
        if decisions.count("new") == len(decisions):
            return None, []
        new: list[int] = []
        aliases: list[tuple[bytes, str]] = []
        for j, decision in enumerate(decisions):
            if decision == "new":
                new.append(j)
            else:
                self.counts.aliased += 1
                if decision in ("committing", "stored"):
                    aliases.append((digests[j], ids[j]))
        return new, aliases

    def _hand_over(self, items: ItemBlock, n_tokens: np.ndarray,
                   aliases: list[tuple[bytes, str]]) -> None:
        """New work to the scheduler (its residues and tokens counted), then the aliases
        (which commit after it)."""
        if len(items):
            self.counts.new += len(items)
            self.counts.residues_new += sum(items.residues)
            self.counts.tokens_new += int(n_tokens.sum(dtype=np.int64))
            self.submit(items, n_tokens)
        if aliases:
            self.alias(aliases)
