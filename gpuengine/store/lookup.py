"""The questions a run asks about the table it writes to, read-only.

:class:`TableLookup` is the one narrow reader upstream code uses while a run writes: the
input validation asks whether a record's id is already mapped to another sequence
(:meth:`TableLookup.conflict`), the planner which ids are stored, which sequences have all
their embeddings, and how many ids and arrays the table holds. Each answer is one short read
transaction on the store's shared environment, so it may run on any thread while the writer
commits (an LMDB reader never blocks the writer). It never writes.

Make one with :meth:`gpuengine.store.writer.StoreWriter.lookup` (it shares the writer's
environment). It sees the table as it was when made: made before the table exists, it
answers as for an empty table.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import lmdb

from gpuengine.records import FastaRecord, RecordProblem
from gpuengine.store import codec
from gpuengine.store.environment import StoreEnv
from gpuengine.store.schema import (
    META_DB,
    TableSpec,
    emb_db_name,
    embedding_keys_from_prefix,
    ids_db_name,
    parse_table_record,
    table_key,
)


class TableLookup:
    """Read-only lookups in one table of a store (see the module docstring)."""

    def __init__(self, env: StoreEnv, table: str) -> None:
        self._env = env
        self.table = table
        meta = env.db(META_DB)
        raw = None if meta is None else env.read(
            lambda txn: _copy(txn.get(table_key(table), db=meta)))
        self.spec: TableSpec | None = (None if raw is None
                                       else parse_table_record(raw, table, env.path))
        """The table's stored spec; None when the store had no such table."""
        self._dbs: dict[str, Any] = {}
        self._pinned: lmdb.Transaction | None = None

    @contextmanager
    def pinned(self) -> Iterator[TableLookup]:
        """This lookup answering :meth:`record_digests` and :meth:`conflict` from one read
        transaction until the block ends, instead of one each: for many questions in a row
        between runs (the daemon validating a group of small files against the store). Only
        while nothing in this process writes the store (the map cannot grow meanwhile), and
        from one thread."""
        if self.spec is not None:  # a handle opened after the transaction began is not in it
            self._db(ids_db_name(self.table))
        with self._env.snapshot() as txn:
            self._pinned = txn
            try:
                yield self
            finally:
                self._pinned = None

    @property
    def path(self) -> str:
        return self._env.path

    def _db(self, name: str) -> Any:
        handle = self._dbs.get(name)
        if handle is None:
            handle = self._dbs[name] = self._env.db(name)
        return handle

    def record_digests(self, record_ids: Sequence[str]) -> list[bytes | None]:
        """The stored sequence digest of each id, or None where the table does not hold it."""
        if self.spec is None:
            return [None] * len(record_ids)
        ids_db = self._db(ids_db_name(self.table))
        keys = [codec.encode_id(rid) for rid in record_ids]

        def work(txn: lmdb.Transaction) -> list[bytes | None]:
            values = (txn.get(key, db=ids_db) for key in keys)
            return [None if v is None else codec.value_digest(v) for v in values]

        if self._pinned is not None:
            return work(self._pinned)
        return self._env.read(work)

    def held(self, record_ids: Sequence[str]) -> list[int]:
        """The positions of the ids the table holds (one read transaction, or the pinned one;
        none at all, and no read, for a table not in the store)."""
        if self.spec is None or not record_ids:
            return []
        return [i for i, d in enumerate(self.record_digests(record_ids)) if d is not None]

    def has_embeddings(self, seq_digests: Sequence[bytes]) -> list[bool]:
        """Whether every output of the table is stored for each sequence digest."""
        spec = self.spec
        if spec is None:
            return [False] * len(seq_digests)
        emb_db = self._db(emb_db_name(self.table))
        prefixes = [spec.embedding_key_prefix(o) for o in spec.outputs]
        keys = list(zip(*(embedding_keys_from_prefix(p, seq_digests) for p in prefixes)))

        def work(txn: lmdb.Transaction) -> list[bool]:
            return [all(txn.get(k, db=emb_db) is not None for k in ks) for ks in keys]

        return self._env.read(work)

    def record_count(self) -> int:
        """Record ids in the table."""
        return self._entries(ids_db_name(self.table))

    def embedding_count(self) -> int:
        """Arrays in the table's embeddings database."""
        return self._entries(emb_db_name(self.table))

    def _entries(self, name: str) -> int:
        if self.spec is None:
            return 0
        db = self._db(name)
        return int(self._env.read(lambda txn: txn.stat(db)["entries"]))

    def conflict(self, record: FastaRecord) -> RecordProblem | None:
        """A ``store-conflict`` problem when the table maps ``record.id`` to a different
        sequence than the record's (truncated as the table truncates), else None."""
        pinned = self._pinned
        if pinned is not None and self.spec is not None:  # one get, no list (a group's files)
            value = pinned.get(codec.encode_id(record.id), db=self._db(ids_db_name(self.table)))
            stored = None if value is None else codec.value_digest(value)
        else:
            stored = self.record_digests([record.id])[0]
        if stored is None:
            return None
        limit = self.spec.max_residues if self.spec is not None else None
        seq = record.sequence[:limit] if limit else record.sequence
        if stored == codec.sequence_digest(seq):
            return None
        return RecordProblem("store-conflict", record.path, record.line, record.id, record.index,
                             detail=f"the store {self.path} already maps this id to a different "
                                    "sequence")


def _copy(value: bytes | memoryview | None) -> bytes | None:
    return None if value is None else bytes(value)
