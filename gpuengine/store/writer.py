"""Transactional writes into a store: tables, embeddings, id mappings and run records.

One :class:`StoreWriter` per store and process; one thread (the engine's committer) calls
its mutating methods. The :class:`~gpuengine.store.lookup.TableLookup` it hands out
(:meth:`StoreWriter.lookup`) may be used on other threads at the same time.

Every :meth:`StoreWriter.commit` is a single LMDB write transaction holding the vectors,
the id mappings and the run counters of a group, so a group is either entirely in the
store or not at all, and the run record never counts what is not there. What a group is made
of, and its encoding outside the transaction, is :mod:`gpuengine.store.commit_group` (its
public names are importable from here too).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import lmdb

from gpuengine import __version__
from gpuengine.errors import InternalError, StoreError, StoreMismatchError
from gpuengine.store import codec
from gpuengine.store.commit_group import (  # noqa: F401 - also imported from here
    CommitEntry,
    CommitPart,
    CommitRows,
    EncodedGroup,
    encode_for_commit,
    embedded_digests,
    group_counts,
    group_nbytes,
)
from gpuengine.store.environment import StoreEnv, open_store
from gpuengine.store.lookup import TableLookup
from gpuengine.store.schema import (
    MAX_TABLES,
    META_DB,
    RUN_STATUSES,
    RUNS_DB,
    SCHEMA_VERSION,
    STORE_KEY,
    TableSpec,
    emb_db_name,
    ids_db_name,
    parse_store_record,
    parse_table_record,
    recorded_precisions,
    table_key,
)
from gpuengine.vocabulary import utc_now

_RUN_ID = re.compile(r"[\x21-\x7e]{1,200}")


def _dump(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, default=str).encode("utf-8")


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


@dataclass(frozen=True)
class _Table:
    spec: TableSpec
    ids_db: Any
    emb_db: Any


class StoreWriter:
    """Opens (creating if needed) a store for writing. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str], *, initial_map_size: int = 1 << 30,
                 sync: bool = True, max_map_size: int = 1 << 44,
                 part: str | None = None) -> None:
        self._path = os.fspath(path)
        self._part = part
        """``"I/N"``: the store is part I of a run's N part stores (:mod:`.parts`); recorded
        in a new store's ``store`` record, checked against an existing one's."""
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
            if self._part is not None:
                record["part"] = self._part
            txn.put(STORE_KEY, _dump(record), db=meta)
        else:
            record = parse_store_record(txn.get(STORE_KEY, db=meta), self._path)
            if self._part is not None and record.get("part") != self._part:
                raise StoreError(f"store {self._path} records part {record.get('part')!r} of a "
                                 f"run's part stores, not {self._part!r}; it was not written "
                                 "as this part (renamed or copied in?)")
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
        return self.commit_encoded(table, encode_for_commit(self._table(table).spec, entries),
                                   run_id=run_id, extra_runs=extra_runs)

    def commit_encoded(self, table: str, group: EncodedGroup, *, run_id: str | None = None,
                       extra_runs: Mapping[str, dict[str, Any]] | None = None) -> tuple[int, int]:
        """:meth:`commit` of a group already encoded for ``table``'s spec
        (:func:`~gpuengine.store.commit_group.encode_for_commit`, outside any transaction: the
        writer process encodes the next group while this one commits)."""
        t = self._table(table)
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

    def _put_group(self, txn: lmdb.Transaction, t: _Table, group: EncodedGroup) -> None:
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
