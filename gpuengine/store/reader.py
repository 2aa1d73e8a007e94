"""Read-only access to a store: ``EmbeddingStore(path)[record_id] -> numpy array``.

Every call runs in its own short read transaction (a long-lived reader would keep LMDB
from reusing freed pages, so the file would grow while a writer runs). Iteration reads the
ids in chunks, one transaction per chunk. Returned arrays are copies in the stored dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import lmdb
import numpy as np

from gpuengine import __version__
from gpuengine.errors import AmbiguousChoiceError, NotInStoreError, StoreError
from gpuengine.store import codec
from gpuengine.store.environment import StoreEnv, open_store
from gpuengine.store.sources import stores_in
from gpuengine.store.schema import (
    META_DB,
    RUNS_DB,
    STORE_KEY,
    OutputSpec,
    TableSpec,
    emb_db_name,
    ids_db_name,
    parse_store_record,
    parse_table_record,
    table_key,
)
from gpuengine.vocabulary import DEFAULT_TABLE

_ITER_CHUNK = 1024
_ITEMS_CHUNK = 128


def _check_table(tables: list[str], table: str, path: str) -> None:
    if table not in tables:
        listed = ", ".join(tables) if tables else "none yet"
        raise NotInStoreError(f"store {path} has no table {table!r}; tables: {listed}")


def _pick_table(tables: list[str], table: str | None, path: str) -> str:
    if table is not None:
        _check_table(tables, table, path)
        return table
    if not tables:
        raise StoreError(f"store {path} holds no table yet")
    if len(tables) == 1:
        return tables[0]
    if DEFAULT_TABLE in tables:
        return DEFAULT_TABLE
    raise AmbiguousChoiceError(f"store {path} holds several tables: {', '.join(tables)}; "
                               "pick one with --table NAME")


def _pick_output(spec: TableSpec, layer: int | None, pool: str | None) -> OutputSpec:
    """The output matching (layer, pool); None matches anything. Negative layers count back."""
    if layer is not None and layer < 0:
        layer = spec.model.num_layers + 1 + layer
    matches = [o for o in spec.outputs
               if (layer is None or o.layer == layer) and (pool is None or o.pool == pool)]
    choices = ", ".join(o.label for o in spec.outputs)
    if layer is None and pool is None:
        return spec.outputs[0]
    if not matches:
        parts = ([] if layer is None else [f"layer{layer}"]) + ([] if pool is None else [pool])
        wanted = "/".join(parts)
        raise NotInStoreError(f"table {spec.name!r} stores no output {wanted}; "
                              f"choices: {choices}")
    if len(matches) > 1:
        raise AmbiguousChoiceError(f"table {spec.name!r}: several outputs match; choices: "
                         f"{', '.join(o.label for o in matches)} (pass both layer and pool)")
    return matches[0]


class EmbeddingStore:
    """Read-only view on one table and one output of a store. Use as a context manager.

    Given a list of stores or a directory of stores, it is a
    :class:`~gpuengine.store.multi.MultiStore`: the stores read as one."""

    def __new__(cls, path: Any = None, *args: Any, **kwargs: Any) -> EmbeddingStore:
        if cls is EmbeddingStore and (not isinstance(path, (str, bytes, os.PathLike))
                                      or stores_in(path)):
            from gpuengine.store.multi import MultiStore

            return super().__new__(MultiStore)
        return super().__new__(cls)

    def __init__(self, path: str | os.PathLike[str], *, table: str | None = None,
                 layer: int | None = None, pool: str | None = None) -> None:
        self._path = os.fspath(path)
        self._env: StoreEnv = open_store(self._path, writer=False, create=False)
        try:
            self._open(table, layer, pool)
        except BaseException:
            self._env.close()
            raise

    def _open(self, table: str | None, layer: int | None, pool: str | None) -> None:
        self._meta_db = _meta_db(self._env, self._path)
        record = self._store_record()
        name = _pick_table(list(record["tables"]), table, self._path)
        raw = self._env.read(lambda txn: _copy(txn.get(table_key(name), db=self._meta_db)))
        self._spec = parse_table_record(raw, name, self._path)
        self._output = _pick_output(self._spec, layer, pool)
        self._ids_db = self._env.db(ids_db_name(name))
        self._emb_db = self._env.db(emb_db_name(name))
        if self._ids_db is None or self._emb_db is None:
            raise StoreError(f"store {self._path}: the databases of table {name!r} are missing")
        self._dtype = codec.numpy_dtype(self._spec.store_dtype)

    def _store_record(self) -> dict[str, Any]:
        return _store_record(self._env, self._meta_db, self._path)

    # -- description ---------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def spec(self) -> TableSpec:
        """The spec of the open table."""
        return self._spec

    @property
    def output(self) -> OutputSpec:
        """The output this view returns."""
        return self._output

    @property
    def tables(self) -> tuple[str, ...]:
        """Names of every table in the store (read now)."""
        return tuple(self._store_record()["tables"])

    def info(self) -> dict[str, Any]:
        """Schema and versions, every table with its spec and counts, map and file sizes."""
        record = self._store_record()
        return _describe(self._env, self._meta_db, record, list(record["tables"]), self._path)

    def runs(self) -> dict[str, dict[str, Any]]:
        """Every run record, by run id."""
        runs_db = self._env.db(RUNS_DB)
        if runs_db is None:
            return {}

        def work(txn: lmdb.Transaction) -> dict[str, dict[str, Any]]:
            with txn.cursor(db=runs_db) as cursor:
                return {bytes(k).decode("ascii"): json.loads(bytes(v)) for k, v in cursor}

        return self._env.read(work)

    # -- lookups -------------------------------------------------------------------------

    def _lookup(self, txn: lmdb.Transaction, record_id: str) -> np.ndarray | None:
        value = txn.get(codec.encode_id(record_id), db=self._ids_db)
        if value is None:
            return None
        return self._array(txn, codec.value_digest(value), record_id)

    def _raw(self, txn: lmdb.Transaction, digest: bytes, record_id: str) -> memoryview:
        buf = txn.get(self._spec.embedding_key(self._output, digest), db=self._emb_db)
        if buf is None:
            raise StoreError(f"store {self._path}: record {record_id!r} maps to sequence "
                             f"{digest.hex()}, whose {self._output.label} embedding is missing")
        return buf

    def _array(self, txn: lmdb.Transaction, digest: bytes, record_id: str) -> np.ndarray:
        buf = self._raw(txn, digest, record_id)
        return codec.decode_array(buf, self._spec.store_dtype, self._spec.dim,
                                  per_token=self._output.per_token)

    def _missing(self, record_id: str) -> KeyError:
        return KeyError(f"record id {record_id!r} is not in store {self._path} "
                        f"table {self._spec.name!r}")

    def __getitem__(self, record_id: str) -> np.ndarray:
        array = self._env.read(lambda txn: self._lookup(txn, record_id))
        if array is None:
            raise self._missing(record_id)
        return array

    def get(self, record_id: str, default: Any = None) -> Any:
        """The array of ``record_id``, or ``default``."""
        array = self._env.read(lambda txn: self._lookup(txn, record_id))
        return default if array is None else array

    def __contains__(self, record_id: object) -> bool:
        if not isinstance(record_id, str) or not record_id:
            return False
        key = codec.encode_id(record_id)
        return self._env.read(lambda txn: txn.get(key, db=self._ids_db) is not None)

    def get_many(self, record_ids: Iterable[str], *,
                 missing: str = "raise") -> np.ndarray | list[np.ndarray]:
        """Arrays of many ids in one transaction, in order.

        Pooled outputs: one ``(N, dim)`` array; per-token: a list of ``(L, dim)`` arrays.
        ``missing="raise"`` raises KeyError naming the first absent id; ``"skip"`` drops them.
        """
        if missing not in ("raise", "skip"):
            raise ValueError(f"missing must be 'raise' or 'skip', got {missing!r}")
        if isinstance(record_ids, str):
            raise TypeError("get_many takes a sequence of ids, not one id string")
        ids = list(record_ids)
        if self._output.per_token:
            return self._env.read(lambda txn: self._many_per_token(txn, ids, missing))
        return self._env.read(lambda txn: self._many_pooled(txn, ids, missing))

    def _many_per_token(self, txn: lmdb.Transaction, ids: list[str],
                        missing: str) -> list[np.ndarray]:
        out = []
        for rid in ids:
            array = self._lookup(txn, rid)
            if array is not None:
                out.append(array)
            elif missing == "raise":
                raise self._missing(rid)
        return out

    def _many_pooled(self, txn: lmdb.Transaction, ids: list[str], missing: str) -> np.ndarray:
        """The rows of ``ids`` gathered as bytes in the transaction and turned into one array
        at once (a few Python operations per id: the key prefix hashed once, no per-row
        array)."""
        row_bytes = self._spec.dim * self._dtype.itemsize
        prefix = self._spec.embedding_key_prefix(self._output)
        blake2b, encode_id, value_digest = hashlib.blake2b, codec.encode_id, codec.value_digest
        get, ids_db, emb_db = txn.get, self._ids_db, self._emb_db
        rows: list = []
        for rid in ids:
            value = get(encode_id(rid), db=ids_db)
            if value is None:
                if missing == "raise":
                    raise self._missing(rid)
                continue
            digest = value_digest(value)
            buf = get(blake2b(prefix + digest, digest_size=16).digest(), db=emb_db)
            if buf is None:
                self._raw(txn, digest, rid)  # raises, naming the record
            if len(buf) != row_bytes:
                codec.decode_array(buf, self._spec.store_dtype, self._spec.dim)  # raises
            rows.append(buf)
        return np.frombuffer(bytearray().join(rows), dtype=self._dtype).reshape(
            len(rows), self._spec.dim)  # a bytearray: the caller's array is writable

    # -- iteration -----------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of record ids in the table."""
        return int(self._env.read(lambda txn: txn.stat(self._ids_db)["entries"]))

    def _chunk(self, txn: lmdb.Transaction, after: bytes | None, size: int, arrays: bool,
               digests: bool) -> list[tuple[bytes, str, bytes | None, np.ndarray | None]]:
        """Up to ``size`` entries with keys after ``after``: (key, id, digest or None, array
        or None)."""
        out: list[tuple[bytes, str, bytes | None, np.ndarray | None]] = []
        with txn.cursor(db=self._ids_db) as cursor:
            ok = cursor.first() if after is None else cursor.set_range(after)
            if ok and after is not None and bytes(cursor.key()) == after:
                ok = cursor.next()
            while ok and len(out) < size:
                key, value = bytes(cursor.key()), cursor.value()
                rid = codec.decode_id(key, value)
                digest = codec.value_digest(value) if arrays or digests else None
                array = self._array(txn, digest, rid) if arrays else None
                out.append((key, rid, digest, array))
                ok = cursor.next()
        return out

    def _entries(self, arrays: bool, digests: bool = False
                 ) -> Iterator[tuple[bytes, str, bytes | None, np.ndarray | None]]:
        """Every (key, id, digest, array) of the table in key order, read in chunks of one
        read transaction each; the array only with ``arrays``, the digest only with ``arrays``
        or ``digests`` (:class:`~gpuengine.store.multi.MultiStore` merges its members' entries
        and compares their digests)."""
        size = _ITEMS_CHUNK if arrays else _ITER_CHUNK
        after: bytes | None = None
        while True:
            chunk = self._env.read(lambda txn, a=after: self._chunk(txn, a, size, arrays,
                                                                     digests))
            yield from chunk
            if len(chunk) < size:
                return
            after = chunk[-1][0]

    def _scan(self, arrays: bool) -> Iterator[tuple[str, np.ndarray | None]]:
        return ((rid, array) for _, rid, _, array in self._entries(arrays))

    def __iter__(self) -> Iterator[str]:
        return self.ids()

    def ids(self) -> Iterator[str]:
        """Every record id (key order: short ids by UTF-8 bytes, then long ids)."""
        return (rid for rid, _ in self._scan(arrays=False))

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """Every (record id, array) pair, in :meth:`ids` order."""
        return ((rid, array) for rid, array in self._scan(arrays=True))  # type: ignore[misc]

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Release the store (idempotent)."""
        self._env.close()

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"EmbeddingStore({self._path!r}, table={self._spec.name!r}, "
                f"output={self._output.label!r})")


def store_info(path: str | os.PathLike[str], *, table: str | None = None) -> dict[str, Any]:
    """What ``gpuengine info`` shows, without choosing a table: schema and versions, every
    table (or only ``table``) with its spec and counts, map and file sizes. Raises
    StoreError for a path that is not a store, NotInStoreError for an absent ``table``."""
    path = os.fspath(path)
    env = open_store(path, writer=False, create=False)
    try:
        meta = _meta_db(env, path)
        record = _store_record(env, meta, path)
        names = list(record["tables"])
        if table is not None:
            _check_table(names, table, path)
            names = [table]
        return _describe(env, meta, record, names, path)
    finally:
        env.close()


def _meta_db(env: StoreEnv, path: str) -> Any:
    meta = env.db(META_DB)
    if meta is None:
        raise StoreError(f"{path} is an LMDB environment but not a gpuengine store "
                         "(it has no meta database)")
    return meta


def _store_record(env: StoreEnv, meta: Any, path: str) -> dict[str, Any]:
    return parse_store_record(env.read(lambda txn: _copy(txn.get(STORE_KEY, db=meta))), path)


def _describe(env: StoreEnv, meta: Any, record: dict[str, Any], names: list[str],
              path: str) -> dict[str, Any]:
    """The info dict of a store, with the tables ``names``."""
    dbs = {name: (env.db(ids_db_name(name)), env.db(emb_db_name(name))) for name in names}

    def work(txn: lmdb.Transaction) -> dict[str, Any]:
        tables = {}
        for name, (ids, emb) in dbs.items():
            spec = parse_table_record(_copy(txn.get(table_key(name), db=meta)), name, path)
            tables[name] = {
                "spec": spec.to_json(),
                "records": 0 if ids is None else txn.stat(ids)["entries"],
                "embeddings": 0 if emb is None else txn.stat(emb)["entries"],
            }
        return tables

    return {
        "path": env.path,
        "schema_version": record["schema_version"],
        "engine_version": record.get("engine_version"),
        "reader_engine_version": __version__,
        "lmdb_lib_version": record.get("lmdb_lib_version"),
        "lmdb_lib_version_running": ".".join(map(str, env.env.lib_version())),
        "created_at": record.get("created_at"),
        "tables": env.read(work),
        "map_size": env.map_size,
        "file_size": os.path.getsize(os.path.join(env.path, "data.mdb")),
    }


def _copy(value: bytes | memoryview | None) -> bytes | None:
    return None if value is None else bytes(value)
