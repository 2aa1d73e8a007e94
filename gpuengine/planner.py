"""From prepared chunks of valid records to work items: resume, deduplicate (torch-free).

The planner runs on its own thread. For every record it decides one of:

* **stored** — the id is already in the table (an earlier or interrupted run): nothing to do;
* **alias** — the same sequence is already stored, committing, or waiting under another id:
  the id is attached to it and is committed with (or after) it, computed once;
* **new** — a work item for the scheduler (a chunk's new items go as one
  :class:`~gpuengine.packing.ItemBlock`).

Whether a sequence is in flight is the :class:`~gpuengine.ledger.Ledger`'s to say; whether it
is stored, the table's :class:`~gpuengine.store.lookup.TableLookup`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from gpuengine.inputs import PreparedChunk, StopFlag
from gpuengine.ledger import Ledger
from gpuengine.packing import TOKEN_DTYPE, ItemBlock
from gpuengine.store.lookup import TableLookup



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
    digest never added; 8 to 16 bits per expected digest give about 0.3-3% false positives."""

    def __init__(self, capacity: int) -> None:
        bits = 1 << min(32, max(16, (8 * capacity).bit_length()))
        self._mask = np.uint32(bits - 1)
        self._bytes = np.zeros(bits // 8, np.uint8)

    def _positions(self, digests: Sequence[bytes]) -> np.ndarray:
        words = np.frombuffer(b"".join(digests), dtype="<u4").reshape(len(digests), 4)
        return words[:, :3] & self._mask

    def maybe_many(self, digests: Sequence[bytes]) -> list[bool]:
        pos = self._positions(digests)
        return ((self._bytes[pos >> 3] >> (pos & 7).astype(np.uint8)) & 1).all(axis=1).tolist()

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

    def __post_init__(self) -> None:
        self.fresh = self.lookup.record_count() == 0
        self.claimed = (DigestFilter(self.expected_records) if self.lookup.embedding_count() == 0
                        else None)

    def run(self, chunks: Iterable[PreparedChunk]) -> None:
        """Plan every chunk (already read, truncated, hashed and tokenized: see
        :mod:`gpuengine.inputs`), in order, until the chunks end or ``stop`` is set."""
        for chunk in chunks:
            if self.stop.is_set():
                return
            self._plan_chunk(chunk)

    def _plan_chunk(self, chunk: PreparedChunk) -> None:
        todo = self._unstored(chunk.ids)
        if not len(todo):
            return
        every = len(todo) == len(chunk.ids)
        truncated = chunk.truncated if every else chunk.truncated[todo]
        self.counts.truncated += int(np.count_nonzero(truncated))
        digests = chunk.digests if every else [chunk.digests[i] for i in todo]
        new, aliases = self._claim(digests, chunk.ids if every else
                                   [chunk.ids[i] for i in todo])
        rows = np.arange(len(chunk.ids)) if every else np.asarray(todo, np.int64)
        if new is not None:  # else every record is new: no per-record choice
            rows, digests = rows[new], [digests[j] for j in new]
        self._hand_over(*self._items(chunk, rows, digests), aliases)

    def _items(self, chunk: PreparedChunk, rows: np.ndarray,
               digests: list[bytes]) -> tuple[ItemBlock, np.ndarray]:
        """Work items of the chunk's records at ``rows`` (with their ``digests``), as one
        block, and their token counts: slices of one ``bytes`` copy of the chunk's token
        buffer, built column-wise (one comprehension of slices: the interpreter's own slice
        objects come from its one-slice cache, where ``map(slice, ...)`` allocates and
        tracks one per item, 70 against 110 ns an item); counts their residues and tokens."""
        ends = chunk.ends[rows]
        starts = ends - np.diff(chunk.ends, prepend=0)[rows]
        sizes, residues = ends - starts, chunk.residues[rows]
        self.counts.residues_new += int(residues.sum(dtype=np.int64))
        self.counts.tokens_new += int(sizes.sum(dtype=np.int64))
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
        block = ItemBlock(list(digests), slices, residues.tolist(), sizes.tolist(), keys)
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

    def _claim(self, digests: list[bytes],
               ids: list[str]) -> tuple[list[int] | None, list[tuple[bytes, str]]]:
        """The ledger's decision for each (digest, id): positions to compute (None: all of
        them), and the aliases of sequences being committed or already stored (others wait
        for an earlier claim)."""
        maybe_seen = None
        if self.claimed is not None:  # the chunk's digests are claimed now
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
        """New work to the scheduler, then the aliases (which commit after it)."""
        if len(items):
            self.counts.new += len(items)
            self.submit(items, n_tokens)
        if aliases:
            self.alias(aliases)
