"""Several stores named at once: which paths are stores, and read-only snapshots of stores.

**A store or a directory of stores.** A path names *a store* when it is a directory holding
``data.mdb``; a path that does not exist or is not a directory is opened as a store too (and
fails the usual way). A directory without ``data.mdb`` is *a directory of stores* (such as
``out/shards/`` of a sharded run) when at least one of its immediate subdirectories holds
``data.mdb``: its stores are those subdirectories, in name order. Hidden entries (names
starting with ``.``, e.g. a shard still being copied in under a temporary name), files and
subdirectories without ``data.mdb`` are ignored; nothing is searched deeper. A list of paths
may mix stores and directories of stores.

:class:`Snapshot` holds one store open with one read transaction: a consistent view of a closed
store (the input of a merge, the shards a verify re-reads).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import lmdb

from gpuengine.errors import StoreError, UsageError
from gpuengine.store.environment import StoreEnv, open_store
from gpuengine.store.schema import (
    META_DB,
    RUNS_DB,
    STORE_KEY,
    TableSpec,
    blake2b16,
    emb_db_name,
    ids_db_name,
    parse_store_record,
    parse_table_record,
    recorded_precisions,
    table_key,
)

DATA_FILE = "data.mdb"
RUN_KEY_LIMIT = 200
"""Run ids are at most 200 printable ASCII characters (the writer's rule)."""
_TWIN_TRIES = 16


class EmptyEnvironment(StoreError):
    """An LMDB environment holding nothing: a store whose creation was killed before its first
    commit (the writer makes a store of it)."""


def is_store_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding ``data.mdb``."""
    return os.path.isfile(os.path.join(os.fspath(path), DATA_FILE))


def stores_in(directory: str | os.PathLike[str]) -> list[str]:
    """The stores of a directory of stores, in name order; [] when ``directory`` is a store,
    not a directory, or holds no store."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory) or is_store_dir(directory):
        return []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [os.path.join(directory, name) for name in names
            if not name.startswith(".") and is_store_dir(os.path.join(directory, name))]


def expand_stores(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]
                  ) -> list[str] | None:
    """The stores that ``paths`` names, by the rule of this module's docstring.

    ``None`` for one path that is not a directory of stores (open it as a single store, as
    always); otherwise the list (a directory of stores, or a list of paths with each
    directory of stores replaced by its stores). UsageError for an empty list or a store
    named twice; StoreError for a directory of stores that holds none.
    """
    if isinstance(paths, (str, os.PathLike)):
        found = stores_in(paths)
        return found or None
    if isinstance(paths, bytes):
        raise UsageError("store paths must be str or os.PathLike, not bytes")
    expanded: list[str] = []
    for path in paths:
        inner = stores_in(path)
        expanded.extend(inner if inner else [os.fspath(path)])
    if not expanded:
        raise UsageError("no store given")
    seen: dict[str, str] = {}
    for path in expanded:
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"store {path} is named twice (also as {seen[real]})")
        seen[real] = path
    return expanded


def store_tag(path: str, created_at: object) -> str:
    """8 hex digits naming one store among others: blake2b of its real path and creation
    time (a store moved elsewhere gets another tag; two stores created in the same
    millisecond on two nodes do not share one)."""
    raw = f"{os.path.realpath(path)}\0{created_at}".encode("utf-8", "surrogateescape")
    return blake2b16(raw).hex()[:8]


def carried_run_key(run_id: str, tag: str) -> str:
    """Key of a run record carried into a merged store (or listed by a union of stores):
    ``<run id>@<store tag>``, so the runs of two shards never collide."""
    suffix = "@" + tag
    return run_id[:RUN_KEY_LIMIT - len(suffix)] + suffix


def shard_label(info: Any) -> str | None:
    """The ``I/N`` label a sharded run records in its run record's ``info.shard`` (a string
    ``"I/N"`` or ``{"index": I, "count": N}``), or None."""
    shard = info.get("shard") if isinstance(info, dict) else None
    if isinstance(shard, str) and shard:
        return shard
    if isinstance(shard, dict) and {"index", "count"} <= set(shard):
        return f"{shard['index']}/{shard['count']}"
    return None


class Snapshot:
    """One store, read-only, through one read transaction held until :meth:`close`.

    Reads the store record, every table's spec and database handles, the run records and the
    entry counts once, from that transaction. ``label`` names the store in messages.
    """

    def __init__(self, path: str | os.PathLike[str], label: str | None = None) -> None:
        self.path = os.fspath(path)
        self.label = label or self.path
        self._stack = ExitStack()
        try:
            self.env: StoreEnv = open_store(self.path, writer=False, create=False)
            self._stack.callback(self.env.close)
            self._open()
        except BaseException:
            self._stack.close()
            raise

    def _open(self) -> None:
        meta = self.env.db(META_DB)
        if meta is None:
            empty = self.env.read(lambda txn: not txn.cursor().first())
            raise (EmptyEnvironment if empty else StoreError)(
                f"{self.path} is an LMDB environment but not a gpuengine store (it has no "
                "meta database)")
        self.record = parse_store_record(
            self.env.read(lambda txn: _copy(txn.get(STORE_KEY, db=meta))), self.path)
        names = list(self.record["tables"])
        dbs = {name: (self.env.db(ids_db_name(name)), self.env.db(emb_db_name(name)))
               for name in names}
        runs_db = self.env.db(RUNS_DB)
        self.txn, self.view_txn = self._stack.enter_context(_twin_snapshots(self.env))
        self.specs: dict[str, TableSpec] = {}
        self.dbs: dict[str, dict[str, Any]] = {}
        self.counts: dict[str, dict[str, int]] = {}
        for name in names:
            ids_db, emb_db = dbs[name]
            if ids_db is None or emb_db is None:
                raise StoreError(f"store {self.path}: the databases of table {name!r} are missing")
            self.specs[name] = parse_table_record(self.txn.get(table_key(name), db=meta),
                                                  name, self.path)
            self.dbs[name] = {"ids": ids_db, "emb": emb_db}
            self.counts[name] = {kind: int(self.txn.stat(db)["entries"])
                                 for kind, db in self.dbs[name].items()}
        self.runs: dict[str, bytes] = {}
        if runs_db is not None:
            with self.txn.cursor(db=runs_db) as cursor:
                self.runs = {bytes(k).decode("ascii", "replace"): bytes(v) for k, v in cursor}

    @property
    def tables(self) -> list[str]:
        return list(self.specs)

    @property
    def tag(self) -> str:
        return store_tag(self.path, self.record.get("created_at"))

    def cursor(self, table: str, kind: str, views: bool = False) -> lmdb.Cursor:
        """A cursor on ``ids:<table>`` (``kind="ids"``) or ``emb:<table>`` (``"emb"``); with
        ``views`` its keys and values are memoryviews of the map (no copy), valid until
        :meth:`close`, the same snapshot as the other cursors'."""
        return (self.view_txn if views else self.txn).cursor(db=self.dbs[table][kind])

    def get(self, table: str, kind: str, key: bytes) -> bytes | None:
        return self.txn.get(key, db=self.dbs[table][kind])

    def entry_bytes(self, table: str, kind: str) -> float:
        """Bytes the database takes per entry (pages / entries), to size reads; 64 if empty."""
        stat = self.txn.stat(self.dbs[table][kind])
        if not stat["entries"]:
            return 64.0
        pages = stat["leaf_pages"] + stat["overflow_pages"] + stat["branch_pages"]
        return max(32.0, pages * stat["psize"] / stat["entries"])

    def precisions(self) -> tuple[str, ...]:
        """What this store's run records show of the compute precision (old tables)."""
        return recorded_precisions(self.runs.values())

    def run_records(self) -> dict[str, dict[str, Any]]:
        """Every run record that parses as a JSON object, by run id."""
        out = {}
        for key, raw in self.runs.items():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                out[key] = record
        return out

    def shard_labels(self) -> list[str]:
        """The ``I/N`` labels of this store's sharded runs (usually one)."""
        labels = {shard_label(r.get("info")) for r in self.run_records().values()}
        return sorted(label for label in labels if label)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this store's content for a merge resuming: its creation time and
        the entry counts of every database (a store only grows, so equal counts mean the
        same content)."""
        return {"created_at": self.record.get("created_at"),
                "tables": {name: [c["ids"], c["emb"]] for name, c in self.counts.items()},
                "runs": len(self.runs)}

    def close(self) -> None:
        """End the read transaction and release the store (idempotent)."""
        self._stack.close()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def _twin_snapshots(env: StoreEnv) -> Iterator[tuple[lmdb.Transaction, lmdb.Transaction]]:
    """Two read transactions of the same snapshot (LMDB transaction id): one yielding bytes,
    one yielding memoryviews of the map (a merge copies values without making bytes of
    them). A commit between the two begins (a store being written) makes them differ: begin
    both again."""
    for _ in range(_TWIN_TRIES):
        with ExitStack() as stack:
            txn = stack.enter_context(env.snapshot())
            views = stack.enter_context(env.snapshot(buffers=True))
            if txn.id() == views.id():
                yield txn, views
                return
    raise StoreError(f"store {env.path} kept changing while it was being opened for reading; "
                     "is a process writing it?")


def _copy(value: bytes | memoryview | None) -> bytes | None:
    return None if value is None else bytes(value)
