"""A store written as N part stores by N writers in parallel (``embed --writers N``).

LMDB allows one writer per environment, so a run that needs more than one writer process
writes N ordinary stores, its *parts*, partitioned by content exactly as shards are: a
sequence's part is :func:`part_of` its digest (the first 8 bytes, little-endian, modulo N; the
one definition, which :mod:`gpuengine.shards` uses too). Identical sequences land in one part,
no sequence is in two, and every id lands in the part of its sequence. Each part is a complete
schema-1 store (its own ids, runs and ``meta``; the ``store`` record says ``"part": "I/N"``),
so the directory holding them is read as one store by every reader of several stores
(:mod:`gpuengine.store.multi`, lookup, info, export) and ``gpuengine merge`` folds it into one.

Layout (N > 1; N = 1 is an ordinary store at OUT itself)::

    OUT/                       a directory of stores
    ├── part-00-of-04.lmdb/    data.mdb, lock.mdb
    ├── part-01-of-04.lmdb/
    ├── part-02-of-04.lmdb/
    └── part-03-of-04.lmdb/

:func:`recorded_parts` says how many parts an OUT holds (what a rerun must use);
:class:`PartsLookup` answers a run's read-only questions (:class:`~gpuengine.store.lookup.
TableLookup`'s) over all the parts: ids are looked up in every part (an id found in a part
that is not its sequence's names another sequence), sequences in their own part.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from gpuengine.errors import StoreError
from gpuengine.records import FastaRecord, RecordProblem
from gpuengine.store import codec
from gpuengine.store.lookup import TableLookup
from gpuengine.store.schema import TableSpec

_PART = re.compile(r"part-(\d+)-of-(\d+)\.lmdb")


part_of = codec.partition_of
"""The part (0..N-1) of a 16-byte sequence digest (the shard rule)."""
parts_of = codec.partitions_of
"""The parts of many digests at once (an int64 array)."""


def part_name(index: int, count: int) -> str:
    """``part-01-of-04.lmdb`` (at least 2 digits)."""
    width = max(2, len(str(count)))
    return f"part-{index:0{width}d}-of-{count:0{width}d}.lmdb"


def part_paths(out: str | os.PathLike[str], count: int) -> list[Path]:
    """The stores a run of ``count`` writers writes for OUT: OUT itself for one."""
    out = Path(out)
    if count == 1:
        return [out]
    return [out / part_name(i, count) for i in range(count)]


def part_label(index: int, count: int) -> str:
    """``"I/N"``, as a part's ``store`` record and run records hold it."""
    return f"{index}/{count}"


def recorded_parts(out: str | os.PathLike[str]) -> int | None:
    """How many parts OUT holds: 1 for a store (``data.mdb``), N for a directory of
    ``part-*-of-N.lmdb`` stores, None for a path that holds neither (a new store).
    StoreError for parts of two different counts."""
    out = Path(out)
    if not out.is_dir():
        return None
    if (out / "data.mdb").exists():
        return 1
    try:
        entries = os.listdir(out)
    except (FileNotFoundError, NotADirectoryError):  # gone since (another run's cleanup)
        return None
    counts = set()
    for entry in entries:
        match = _PART.fullmatch(entry)
        if match:
            counts.add(int(match.group(2)))
    if not counts:
        return None
    if len(counts) > 1:
        raise StoreError(f"{out} holds the parts of runs with different numbers of writers "
                         f"({', '.join(map(str, sorted(counts)))}); keep one set of parts "
                         "(or merge them with gpuengine merge into another store)")
    return counts.pop()


class PartsLookup:
    """:class:`~gpuengine.store.lookup.TableLookup`'s questions over the N parts of a store
    (the planner and the input validation ask it as they ask one table)."""

    def __init__(self, lookups: Sequence[TableLookup], path: str | os.PathLike[str]) -> None:
        self.parts = list(lookups)
        self.count = len(self.parts)
        self.table = self.parts[0].table if self.parts else ""
        self._path = os.fspath(path)
        specs = [lookup.spec for lookup in self.parts if lookup.spec is not None]
        self.spec: TableSpec | None = specs[0] if specs else None
        self._held = [lookup for lookup in self.parts if lookup.spec is not None]
        """The parts that hold the table (an id can be found only there)."""

    @property
    def path(self) -> str:
        return self._path

    @contextmanager
    def pinned(self) -> Iterator[PartsLookup]:
        with ExitStack() as stack:
            for lookup in self.parts:
                stack.enter_context(lookup.pinned())
            yield self

    def record_digests(self, record_ids: Sequence[str]) -> list[bytes | None]:
        """The stored digest of each id in any part (the first part that holds it; a
        conflicting second mapping is refused before a run writes, see :meth:`conflict`)."""
        found: list[bytes | None] = [None] * len(record_ids)
        for lookup in self._held:
            missing = [i for i, d in enumerate(found) if d is None]
            if not missing:
                break
            answers = lookup.record_digests([record_ids[i] for i in missing])
            for i, digest in zip(missing, answers):
                if digest is not None:
                    found[i] = digest
        return found

    def has_embeddings(self, seq_digests: Sequence[bytes]) -> list[bool]:
        """Whether every output of the table is stored for each digest, in its part."""
        if self.spec is None or not seq_digests:
            return [False] * len(seq_digests)
        owners = parts_of(seq_digests, self.count)
        out = [False] * len(seq_digests)
        for index, lookup in enumerate(self.parts):
            rows = np.flatnonzero(owners == index).tolist()
            if rows and lookup.spec is not None:
                for row, ok in zip(rows, lookup.has_embeddings([seq_digests[r] for r in rows])):
                    out[row] = ok
        return out

    def record_count(self) -> int:
        return sum(lookup.record_count() for lookup in self._held)

    def embedding_count(self) -> int:
        return sum(lookup.embedding_count() for lookup in self._held)

    def held(self, record_ids: Sequence[str]) -> list[int]:
        """The positions of the ids any part holds."""
        return [i for i, d in enumerate(self.record_digests(record_ids)) if d is not None]

    def conflict(self, record: FastaRecord) -> RecordProblem | None:
        """A ``store-conflict`` problem when any part maps ``record.id`` to another sequence."""
        for lookup in self._held:
            problem = lookup.conflict(record)
            if problem is not None:
                return problem
        return None
