"""Transactional writes into a store: tables, embeddings, id mappings and run records.

One :class:`StoreWriter` per store and process; one thread (the engine's committer) calls
its mutating methods. The :class:`~gpuengine.store.lookup.TableLookup` it hands out
(:meth:`StoreWriter.lookup`) may be used on other threads at the same time.

Every :meth:`StoreWriter.commit` is a single LMDB write transaction holding the vectors,
the id mappings and the run counters of a group, so a group is either entirely in the
store or not at all, and the run record never counts what is not there.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import re
from itertools import chain, repeat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import lmdb
import numpy as np

from gpuengine import __version__
from gpuengine.errors import InternalError, StoreError, StoreMismatchError
from gpuengine.store import codec
from gpuengine.store.environment import StoreEnv, open_store
from gpuengine.store.lookup import TableLookup
from gpuengine.store.schema import (
    MAX_TABLES,
    META_DB,
    RUN_STATUSES,
    RUNS_DB,
    SCHEMA_VERSION,
    STORE_KEY,
    OutputSpec,
    TableSpec,
    emb_db_name,
    embedding_key_from_prefix,
    embedding_keys_from_prefix,
    ids_db_name,
    parse_store_record,
    parse_table_record,
    recorded_precisions,
    table_key,
)
from gpuengine.vocabulary import utc_now

_RUN_ID = re.compile(r"[\x21-\x7e]{1,200}")
_ENTRY_OVERHEAD = 64
"""Rough per-record bytes of LMDB overhead, for the map-growth size hint."""


def _dump(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, default=str).encode("utf-8")


@dataclass(frozen=True)
class CommitEntry:
    """One sequence of a commit group and the record ids that name it."""

    seq_digest: bytes
    record_ids: tuple[str, ...]
    """Ids to map to this sequence (at least one)."""
    vectors: Mapping[OutputSpec, np.ndarray] | None
    """One array per output of the table; None: alias only, the embeddings must be stored."""

    def __post_init__(self) -> None:
        if not isinstance(self.seq_digest, bytes) or len(self.seq_digest) != codec.DIGEST_SIZE:
            raise InternalError(f"CommitEntry.seq_digest must be 16 bytes, got {self.seq_digest!r}")
        object.__setattr__(self, "record_ids", tuple(self.record_ids))
        if not self.record_ids:
            raise InternalError(f"CommitEntry for {self.seq_digest.hex()} names no record id")


@dataclass(frozen=True)
class CommitRows:
    """Many sequences of a commit group held column-wise (one device batch, as the engine
    hands it on): row ``i`` is ``seq_digests[i]``, named by ``record_ids[i]``, with
    ``vectors[output][i]``. Encoded without an object per sequence; the store holds exactly
    what the same rows as :class:`CommitEntry` objects would give."""

    seq_digests: Sequence[bytes]
    record_ids: Sequence[tuple[str, ...]]
    """Per row, the ids to map to its sequence (at least one)."""
    vectors: Mapping[OutputSpec, Sequence[np.ndarray]]
    """Per output of the table, one array per row (a list of arrays or one stacked array)."""
    embedding_keys: Sequence[Sequence[bytes]] = ()
    """Per output of the table, in the table's order, each row's embedding key as the input
    side computed it (``blake2b-16(prefix + digest)``; the writer checks the first of each);
    empty: the writer computes them."""

    def __post_init__(self) -> None:
        n = len(self.seq_digests)
        if self.embedding_keys and any(len(k) != n for k in self.embedding_keys):
            raise InternalError(f"CommitRows: {n} digests but embedding keys of "
                                f"{[len(k) for k in self.embedding_keys]} rows")
        if len(self.record_ids) != n or any(len(v) != n for v in self.vectors.values()):
            raise InternalError(
                f"CommitRows: {n} digests, {len(self.record_ids)} id tuples and vectors of "
                f"{[len(v) for v in self.vectors.values()]} rows must all be as many")
        if n and not (set(map(type, self.seq_digests)) == {bytes}  # no step per row
                      and set(map(len, self.seq_digests)) == {codec.DIGEST_SIZE}):
            raise InternalError("CommitRows.seq_digests must all be 16-byte digests")
        if not all(self.record_ids):
            raise InternalError("CommitRows: a row names no record id")

    def __len__(self) -> int:
        return len(self.seq_digests)


CommitPart = CommitEntry | CommitRows
"""What a commit group is made of: single sequences (aliases, tests) and column-wise rows."""

Summary = TypeVar("Summary", contravariant=True)


class CompletionRecords(Protocol[Summary]):
    """Run records a caller has committed in the same transaction as a run's last embeddings
    (:meth:`StoreWriter.commit`'s ``extra_runs``), so they are durable exactly when the run's
    output is: the daemon's job record says a file is done only once its vectors are.

    The engine calls it once, on its own thread, only when the run completed (never when it
    was stopped or failed), with the run's summary as it will be returned (the wall time and
    the wait for the writer excepted); it returns whole records of the ``runs`` database by
    id (written as given, replacing a record of the same id). What it raises fails the run
    before its last group is committed."""

    def __call__(self, summary: Summary, /) -> Mapping[str, Mapping[str, Any]]: ...


def embedded_digests(group: Sequence[CommitPart]) -> list[bytes]:
    """Digests of the sequences a group commits vectors for (aliases excluded)."""
    out: list[bytes] = []
    for part in group:
        if type(part) is CommitRows:
            out.extend(part.seq_digests)
        elif part.vectors is not None:
            out.append(part.seq_digest)
    return out


def group_nbytes(group: Sequence[CommitPart]) -> int:
    """Bytes of the vectors a group holds (as computed, before any cast to the store dtype)."""
    total = 0
    for part in group:
        for arrays in (part.vectors or {}).values():  # an array, or a list of row arrays
            total += (arrays.nbytes if isinstance(arrays, np.ndarray)
                      else sum(getattr(a, "nbytes", 0) for a in arrays))
    return total


def group_counts(group: Sequence[CommitPart]) -> tuple[int, int]:
    """(sequences committed with vectors, record ids mapped) of a group."""
    sequences = records = 0
    for part in group:
        if type(part) is CommitRows:
            sequences += len(part)
            records += sum(map(len, part.record_ids))
        else:
            sequences += part.vectors is not None
            records += len(part.record_ids)
    return sequences, records


@dataclass(frozen=True)
class _Table:
    spec: TableSpec
    ids_db: Any
    emb_db: Any


@dataclass
class _Group:
    """A commit group encoded outside the transaction; each list sorted by key (putmulti
    then walks the B-tree in order; the sort is stable, so duplicate keys keep their order)."""

    arrays: list[tuple[bytes, Any]]  # (embedding key, array bytes or a C-contiguous array)
    ids: list[tuple[bytes, bytes]]  # (id key, id value)
    aliases: list[tuple[bytes, str, bytes]]  # (embedding key, output label, digest) to check
    sequences: int
    nbytes: int
    """Bytes the group adds to the map (a size hint for growing it)."""


def _check_vector(spec: TableSpec, output: OutputSpec, array: np.ndarray, digest: bytes) -> None:
    shape = getattr(array, "shape", None)
    if shape is None:
        shape = np.shape(array)
    if output.per_token:
        ok = len(shape) == 2 and shape[0] >= 1 and shape[1] == spec.dim
        wanted = f"(residues >= 1, {spec.dim})"
    else:
        ok = shape == (spec.dim,)
        wanted = f"({spec.dim},)"
    if not ok:
        raise InternalError(
            f"sequence {digest.hex()}: {output.label} array has shape {shape}, expected {wanted}"
        )


def _encode_rows(spec: TableSpec, rows: CommitRows, prefixes: list[bytes],
                 arrays: list[tuple[bytes, Any]], ids: list[tuple[bytes, bytes]]) -> int:
    """Encode column-wise rows into ``arrays`` and ``ids``; returns the bytes of the arrays.
    The one encoder of vectors: a :class:`CommitEntry` with vectors comes here as one row.

    A pooled row already in the store dtype is written from the array itself (LMDB copies
    its buffer; nothing is copied before); other rows are stacked and cast once per output,
    per-token arrays one by one (:func:`~gpuengine.store.codec.encode_array`)."""
    digests, outputs = rows.seq_digests, spec.outputs
    if set(rows.vectors) != set(outputs):
        got = ", ".join(sorted(getattr(o, "label", repr(o)) for o in rows.vectors))
        first = f"sequence {digests[0].hex()}: " if len(digests) == 1 else "rows of "
        raise InternalError(f"{first}vectors for [{got}], table {spec.name!r} stores "
                            f"[{', '.join(o.label for o in outputs)}]")
    flat = list(chain.from_iterable(rows.record_ids))
    named = digests if len(flat) == len(digests) else list(
        chain.from_iterable(map(repeat, digests, map(len, rows.record_ids))))
    try:
        ids.extend(codec.encode_id_pairs(flat, named))
    except ValueError as exc:
        raise InternalError(f"bad record id in a commit: {exc}") from exc
    dtype, shape = codec.numpy_dtype(spec.store_dtype), (spec.dim,)
    nbytes = 0
    given = rows.embedding_keys
    if given and len(given) != len(outputs):
        raise InternalError(f"rows carry embedding keys of {len(given)} outputs, table "
                            f"{spec.name!r} stores {len(outputs)}")
    for j, (prefix, output) in enumerate(zip(prefixes, outputs)):
        vectors = rows.vectors[output]
        if given and digests:  # computed by the input side: the first must be this table's
            keys = given[j]
            if keys[0] != embedding_key_from_prefix(prefix, digests[0]):
                raise InternalError(f"sequence {digests[0].hex()}: the embedding key the input "
                                    f"side computed is not table {spec.name!r}'s for "
                                    f"{output.label}")
        else:
            keys = embedding_keys_from_prefix(prefix, digests)
        if output.per_token:
            data = []
            for array, digest in zip(vectors, digests):
                _check_vector(spec, output, array, digest)
                data.append(codec.encode_array(array, spec.store_dtype))
            nbytes += sum(map(len, data))
        elif type(vectors) is np.ndarray:  # one (rows, dim) array: checked and cast at once
            if vectors.shape != (len(digests), spec.dim):
                raise InternalError(f"rows of {len(digests)} sequences: {output.label} array "
                                    f"has shape {vectors.shape}, expected "
                                    f"({len(digests)}, {spec.dim})")
            if vectors.dtype.kind not in "fiu":
                raise ValueError(f"an embedding must hold numbers, got dtype {vectors.dtype}")
            data = list(np.ascontiguousarray(vectors, dtype=dtype))  # row views: LMDB copies
            nbytes += len(digests) * dtype.itemsize * spec.dim
        elif all(type(a) is np.ndarray and a.dtype == dtype and a.shape == shape
                 and a.flags.c_contiguous for a in vectors):
            data = vectors
            nbytes += len(digests) * dtype.itemsize * spec.dim
        else:
            for array, digest in zip(vectors, digests):
                _check_vector(spec, output, array, digest)
            stacked = np.stack(vectors) if len(digests) else np.empty((0, spec.dim))
            if stacked.dtype.kind not in "fiu":
                raise ValueError(f"an embedding must hold numbers, got dtype {stacked.dtype}")
            matrix = np.ascontiguousarray(stacked, dtype=dtype)
            data = list(matrix)  # C-contiguous rows of the cast matrix
            nbytes += matrix.nbytes
        arrays.extend(zip(keys, data))
    return nbytes


def _encode_group(spec: TableSpec, entries: Sequence[CommitPart]) -> _Group:
    """Validate and encode a group (pure: no store access). Vectors go through
    :func:`_encode_rows` (a CommitEntry as one row); an alias-only entry adds its id mappings
    and the embedding keys the transaction must find."""
    prefixes = [spec.embedding_key_prefix(o) for o in spec.outputs]
    arrays: list[tuple[bytes, Any]] = []
    ids: list[tuple[bytes, bytes]] = []
    aliases: list[tuple[bytes, str, bytes]] = []
    nbytes = 0
    for entry in entries:
        if type(entry) is CommitRows:
            nbytes += _encode_rows(spec, entry, prefixes, arrays, ids)
        elif entry.vectors is not None:
            one = CommitRows((entry.seq_digest,), (entry.record_ids,),
                             {o: (v,) for o, v in entry.vectors.items()})
            nbytes += _encode_rows(spec, one, prefixes, arrays, ids)
        else:
            digest = entry.seq_digest
            try:
                ids.extend(codec.encode_id_pair(rid, digest) for rid in entry.record_ids)
            except ValueError as exc:
                raise InternalError(f"bad record id in a commit: {exc}") from exc
            aliases.extend((embedding_key_from_prefix(prefix, digest), o.label, digest)
                           for prefix, o in zip(prefixes, spec.outputs))
    nbytes += (sum(map(len, map(_first, ids))) + sum(map(len, map(_second, ids)))
               + len(ids) * _ENTRY_OVERHEAD + len(arrays) * (16 + _ENTRY_OVERHEAD))
    arrays = codec.sorted_by_key(arrays)
    ids.sort(key=_first)
    return _Group(arrays, ids, aliases, group_counts(entries)[0], nbytes)


_first, _second = operator.itemgetter(0), operator.itemgetter(1)


class StoreWriter:
    """Opens (creating if needed) a store for writing. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str], *, initial_map_size: int = 1 << 30,
                 sync: bool = True, max_map_size: int = 1 << 44) -> None:
        self._path = os.fspath(path)
        self._env: StoreEnv = open_store(
            self._path, writer=True, create=True, map_size=initial_map_size, sync=sync,
            max_map_size=max_map_size,
        )
        self._tables: dict[str, _Table] = {}
        try:
            self._env.ensure_map_size(initial_map_size)
            self._meta_db, self._runs_db = self._env.write(self._init_store)
            self._env.remember(META_DB, self._meta_db)
            self._env.remember(RUNS_DB, self._runs_db)
        except BaseException:
            self._env.close()
            raise

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def map_size(self) -> int:
        """Current LMDB map size in bytes."""
        return self._env.map_size

    @property
    def map_growths(self) -> int:
        """How many times a commit grew the map after ``MapFullError``."""
        return self._env.growths

    def close(self) -> None:
        """Release the store (idempotent)."""
        self._env.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _init_store(self, txn: lmdb.Transaction) -> tuple[Any, Any]:
        """Create the meta record on a new store, or check the existing one."""
        meta = self._env.db_in(txn, META_DB)
        if meta is None:
            with txn.cursor() as cursor:
                if cursor.first():
                    raise StoreError(
                        f"{self._path} is an LMDB environment but not a gpuengine store "
                        "(it has no meta database); refusing to write into it"
                    )
            meta = self._env.db_in(txn, META_DB, create=True)
            record = {
                "schema_version": SCHEMA_VERSION,
                "engine_version": __version__,
                "lmdb_lib_version": ".".join(map(str, self._env.env.lib_version())),
                "created_at": utc_now(),
                "tables": [],
            }
            txn.put(STORE_KEY, _dump(record), db=meta)
        else:
            parse_store_record(txn.get(STORE_KEY, db=meta), self._path)
        runs = self._env.db_in(txn, RUNS_DB, create=True)
        return meta, runs

    # -- tables --------------------------------------------------------------------------

    def open_table(self, spec: TableSpec) -> None:
        """Create the table, or check that the stored one means the same (StoreMismatchError)."""
        if not isinstance(spec, TableSpec):
            raise InternalError(f"open_table needs a TableSpec, got {spec!r}")
        table = self._env.write(lambda txn: self._open_table(txn, spec))
        self._env.remember(ids_db_name(spec.name), table.ids_db)
        self._env.remember(emb_db_name(spec.name), table.emb_db)
        self._tables[spec.name] = table

    def _open_table(self, txn: lmdb.Transaction, spec: TableSpec) -> _Table:
        record = parse_store_record(txn.get(STORE_KEY, db=self._meta_db), self._path)
        stored, adopt = self._checked(txn, spec)
        if stored is not None:
            if adopt:  # an old record learns its precision (docs/store.md)
                stored = dataclasses.replace(stored, precision=spec.precision)
                txn.put(table_key(spec.name), _dump(stored.to_json()), db=self._meta_db)
            spec = stored  # same meaning; keeps the stored order of outputs
        else:
            if len(record["tables"]) >= MAX_TABLES:
                raise StoreError(f"store {self._path} already holds {MAX_TABLES} tables, the most "
                                 "one store can hold; use another --out")
            record["tables"] = [*record["tables"], spec.name]
            txn.put(STORE_KEY, _dump(record), db=self._meta_db)
            txn.put(table_key(spec.name), _dump(spec.to_json()), db=self._meta_db)
        ids_db = self._env.db_in(txn, ids_db_name(spec.name), create=True)
        emb_db = self._env.db_in(txn, emb_db_name(spec.name), create=True)
        return _Table(spec, ids_db, emb_db)

    def _precisions(self, txn: lmdb.Transaction, stored: TableSpec) -> tuple[str, ...]:
        """The compute precisions ``stored``'s vectors can have: the recorded one; for an old
        record without it, those the store's run records show (empty: unknown)."""
        if stored.precision is not None:
            return (stored.precision,)
        with txn.cursor(db=self._runs_db) as cursor:
            return recorded_precisions(value for _, value in cursor)

    def _checked(self, txn: lmdb.Transaction,
                 spec: TableSpec) -> tuple[TableSpec | None, bool]:
        """(the stored spec of ``spec.name`` or None, whether that old record without a
        precision takes ``spec``'s); StoreMismatchError when it means something else."""
        raw = txn.get(table_key(spec.name), db=self._meta_db)
        if raw is None:
            return None, False
        stored = parse_table_record(raw, spec.name, self._path)
        diffs = stored.differences(spec)
        adopt = stored.precision is None and spec.precision is not None
        shown = self._precisions(txn, stored) if spec.precision is not None else ()
        other_precision = bool(shown) and spec.precision not in shown
        if adopt and other_precision:
            diffs.append(f"compute precision differs (store: {' or '.join(shown)}, by its run "
                         f"records; run: {spec.precision})")
        if diffs:
            precision_hint = (f"to add to this table, pass --precision {' or '.join(shown)}; "
                              if other_precision else "")
            raise StoreMismatchError(
                f"store {self._path} table {spec.name!r} holds {stored.describe()}; "
                f"this run asks for {spec.describe()}; differences: {'; '.join(diffs)}; "
                f"{precision_hint}to keep both, add a new named table with --table NAME "
                "(or use another --out)"
            )
        return stored, adopt

    def check_table(self, spec: TableSpec) -> TableSpec | None:
        """What :meth:`open_table` checks, creating and recording nothing: the stored spec
        (None: no such table), or StoreMismatchError."""
        return self._env.read(lambda txn: self._checked(txn, spec))[0]

    def check_precision(self, table: str, precision: str, how: str = "") -> None:
        """StoreMismatchError when ``table`` exists and its vectors were computed in another
        precision (so a run can be refused before it reads its input and weights); ``how``
        says where the run's precision came from."""
        def work(txn: lmdb.Transaction) -> tuple[TableSpec, tuple[str, ...]] | None:
            raw = txn.get(table_key(table), db=self._meta_db)
            if raw is None:
                return None
            stored = parse_table_record(raw, table, self._path)
            return stored, self._precisions(txn, stored)

        found = self._env.read(work)
        if found is None or not found[1] or precision in found[1]:
            return
        stored, shown = found
        evidence = " (by its run records)" if stored.precision is None else ""
        raise StoreMismatchError(
            f"store {self._path} table {table!r} holds embeddings computed in "
            f"{' or '.join(shown)}{evidence}; this run computes in {precision}{how}, and one "
            f"table holds one precision. To add to this table, pass --precision "
            f"{' or '.join(shown)}; to keep both, add a new named table with --table NAME "
            "(or use another --out)")

    def _table(self, name: str) -> _Table:
        try:
            return self._tables[name]
        except KeyError:
            raise InternalError(f"table {name!r} used before open_table()") from None

    # -- queries (any thread) ------------------------------------------------------------

    def is_empty(self) -> bool:
        """True when no table holds a single record id (a store a failed run may remove)."""
        def work(txn: lmdb.Transaction) -> bool:
            record = parse_store_record(txn.get(STORE_KEY, db=self._meta_db), self._path)
            for name in record["tables"]:
                ids_db = self._env.db_in(txn, ids_db_name(name))
                if ids_db is not None and txn.stat(ids_db)["entries"]:
                    return False
            return True

        return self._env.read(work)

    def stored_spec(self, name: str) -> TableSpec | None:
        """The table's stored spec, or None if the store has no such table (nothing created)."""
        raw = self._env.read(lambda txn: _copy(txn.get(table_key(name), db=self._meta_db)))
        return None if raw is None else parse_table_record(raw, name, self._path)

    def lookup(self, table: str) -> TableLookup:
        """Read-only lookups in ``table`` as it is now (record digests, stored embeddings,
        counts), on this writer's environment: safe on other threads while it commits."""
        return TableLookup(self._env, table)

    # -- runs ----------------------------------------------------------------------------

    @staticmethod
    def _run_key(run_id: str) -> bytes:
        if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
            raise ValueError(f"a run id is 1-200 printable ASCII characters without spaces, "
                             f"got {run_id!r}")
        return run_id.encode("ascii")

    def begin_run(self, run_id: str, info: dict[str, Any]) -> dict[str, Any]:
        """Create the run record, or reopen it (status back to running, counts kept)."""
        key = self._run_key(run_id)
        info_json = json.loads(_dump(info))

        def work(txn: lmdb.Transaction) -> dict[str, Any]:
            raw = txn.get(key, db=self._runs_db)
            now = utc_now()
            if raw is None:
                record = {"run_id": run_id, "status": "running", "committed_sequences": 0,
                          "committed_records": 0, "started_at": now, "resumes": 0}
            else:
                record = json.loads(bytes(raw))
                record["status"] = "running"
                record["resumes"] = int(record.get("resumes", 0)) + 1
                record["resumed_at"] = now
            record["updated_at"] = now
            record["info"] = info_json
            txn.put(key, _dump(record), db=self._runs_db)
            return record

        return self._env.write(work)

    def finish_run(self, run_id: str, status: str, summary: dict[str, Any]) -> None:
        """Set the run's final status and summary."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {', '.join(RUN_STATUSES)}; got {status!r}")
        key = self._run_key(run_id)
        summary_json = json.loads(_dump(summary))

        def work(txn: lmdb.Transaction) -> None:
            record = self._load_run(txn, key)
            now = utc_now()
            record.update(status=status, updated_at=now, finished_at=now, summary=summary_json)
            txn.put(key, _dump(record), db=self._runs_db)

        self._env.write(work)

    def _load_run(self, txn: lmdb.Transaction, key: bytes) -> dict[str, Any]:
        raw = txn.get(key, db=self._runs_db)
        if raw is None:
            raise InternalError(f"run {key.decode()!r} used before begin_run()")
        return json.loads(bytes(raw))

    def run_record(self, run_id: str) -> dict[str, Any] | None:
        """The stored run record, or None."""
        key = self._run_key(run_id)
        raw = self._env.read(lambda txn: _copy(txn.get(key, db=self._runs_db)))
        return None if raw is None else json.loads(raw)

    # -- commits -------------------------------------------------------------------------

    def commit(self, table: str, entries: Sequence[CommitPart], *,
               run_id: str | None = None,
               extra_runs: Mapping[str, dict[str, Any]] | None = None) -> tuple[int, int]:
        """Write a group atomically: vectors, id mappings, the run's counters, and any
        ``extra_runs`` records (whole run records by id, e.g. a daemon's job record).
        Returns what the run's counters advanced by: (sequences with vectors, record ids),
        as :func:`group_counts` of ``entries``.

        Raises StoreMismatchError (nothing written) when an id is already mapped to another
        sequence, InternalError when an alias-only entry's embeddings are not stored.
        """
        t = self._table(table)
        group = _encode_group(t.spec, entries)
        run_key = None if run_id is None else self._run_key(run_id)

        def work(txn: lmdb.Transaction) -> None:
            self._put_group(txn, t, group)
            if run_key is not None:
                record = self._load_run(txn, run_key)
                record["committed_sequences"] = record["committed_sequences"] + group.sequences
                record["committed_records"] = record["committed_records"] + len(group.ids)
                record["updated_at"] = utc_now()
                txn.put(run_key, _dump(record), db=self._runs_db)
            for other_id, other in (extra_runs or {}).items():
                txn.put(self._run_key(other_id), _dump(other), db=self._runs_db)

        self._env.write(work, size_hint=group.nbytes + 4096)
        return group.sequences, len(group.ids)

    def _put_group(self, txn: lmdb.Transaction, t: _Table, group: _Group) -> None:
        """Vectors first (one ``putmulti``), then alias checks, then id mappings (one
        ``putmulti`` that never overwrites; ids that were already there are checked)."""
        if group.arrays:
            with txn.cursor(db=t.emb_db) as cursor:
                cursor.putmulti(group.arrays)
        for key, label, digest in group.aliases:
            if txn.get(key, db=t.emb_db) is None:
                raise InternalError(
                    f"alias-only commit for sequence {digest.hex()}, but its {label} "
                    f"embedding is not in table {t.spec.name!r}"
                )
        with txn.cursor(db=t.ids_db) as cursor:
            consumed, added = cursor.putmulti(group.ids, overwrite=False)
        if added == consumed:
            return
        for key, value in group.ids:  # some ids were already stored: each must name the same sequence
            old = codec.value_digest(txn.get(key, db=t.ids_db))
            if old != codec.value_digest(value):
                raise StoreMismatchError(
                    f"record id {codec.decode_id(key, value)!r} is already in store {self._path} "
                    f"table {t.spec.name!r} for a different sequence (stored digest "
                    f"{old.hex()}, this run {codec.value_digest(value).hex()}); an id "
                    "must name one sequence: rename the record, or use another --table "
                    "or --out"
                )


def _copy(value: bytes | memoryview | None) -> bytes | None:
    return None if value is None else bytes(value)
