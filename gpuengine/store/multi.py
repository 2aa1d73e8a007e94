"""Several stores read as one, without merging them: ``EmbeddingStore(["a.lmdb", "b.lmdb"])``
or ``EmbeddingStore("out/shards")`` (a directory of stores; the rule is in
:mod:`gpuengine.store.sources`).

The union answers as the store ``gpuengine merge`` would make of the same stores, in the same
order: the table's copies must mean the same (refused as a merge refuses them), every id
appears once (the first store's copy), and an id that two stores map to different sequences
is a StoreMismatchError naming it. Each call reads every member store in its own short read
transaction, as a single store's reader does; iteration merges the members' ids in key order
(one transaction per chunk per store). ``len()`` counts distinct ids, which takes a pass over
the members' ids (a merged store answers from LMDB's counters at once).
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Any

import lmdb
import numpy as np

from gpuengine import __version__
from gpuengine.errors import StoreMismatchError
from gpuengine.store import codec
from gpuengine.store.compat import TableCopy, combined_spec
from gpuengine.store.kway import first
from gpuengine.store.reader import EmbeddingStore, _pick_table
from gpuengine.store.schema import OutputSpec, TableSpec
from gpuengine.store.sources import Snapshot, carried_run_key, expand_stores

StorePaths = str | os.PathLike[str] | Iterable[str | os.PathLike[str]]


def _label(given: StorePaths, paths: list[str]) -> str:
    if isinstance(given, (str, os.PathLike)):
        return f"{os.fspath(given)} ({len(paths)} stores)"
    return f"the stores {', '.join(paths)}" if len(paths) <= 3 else \
        f"the {len(paths)} stores {paths[0]} … {paths[-1]}"


def _snapshots(paths: list[str]) -> list[Snapshot]:
    snaps: list[Snapshot] = []
    try:
        for path in paths:
            snaps.append(Snapshot(path))
    except BaseException:
        for snap in snaps:
            snap.close()
        raise
    return snaps


def _union_spec(name: str, snaps: list[Snapshot]) -> TableSpec:
    return combined_spec([TableCopy(s.label, s.specs[name],
                                    s.precisions() if s.specs[name].precision is None else ())
                          for s in snaps if name in s.specs])


class MultiStore(EmbeddingStore):
    """Read-only view on one table and one output of several stores, as one store."""

    def __init__(self, paths: StorePaths, *, table: str | None = None,
                 layer: int | None = None, pool: str | None = None) -> None:
        self._given = paths if isinstance(paths, (str, os.PathLike)) else tuple(paths)
        self._paths = expand_stores(self._given) or [os.fspath(paths)]  # type: ignore[arg-type]
        self._name = _label(self._given, self._paths)
        snaps = _snapshots(self._paths)
        try:
            self._tables = tuple(dict.fromkeys(t for s in snaps for t in s.tables))
            name = _pick_table(list(self._tables), table, self._name)
            self._spec = _union_spec(name, snaps)
            self._tags = {s.path: s.tag for s in snaps}
            holders = [s.path for s in snaps if name in s.specs]
        finally:
            for snap in snaps:
                snap.close()
        self._members: list[EmbeddingStore] = []
        try:
            head = EmbeddingStore(holders[0], table=name, layer=layer, pool=pool)
            self._members.append(head)
            self._output: OutputSpec = head.output
            for path in holders[1:]:
                self._members.append(EmbeddingStore(path, table=name, layer=self._output.layer,
                                                    pool=self._output.pool))
        except BaseException:
            self.close()
            raise
        self._dtype = codec.numpy_dtype(self._spec.store_dtype)

    # -- description ---------------------------------------------------------------------

    @property
    def path(self) -> Any:  # type: ignore[override]
        """What was given (a directory of stores, or the paths): ``EmbeddingStore(path)``
        opens the same union again."""
        return self._given

    @property
    def stores(self) -> tuple[str, ...]:
        """The member stores that hold the open table, in order."""
        return tuple(m.path for m in self._members)

    @property
    def tables(self) -> tuple[str, ...]:
        """Names of every table of any member (read when opened)."""
        return self._tables

    def info(self) -> dict[str, Any]:
        """:func:`stores_info` of the members."""
        return stores_info(self._paths)

    def runs(self) -> dict[str, dict[str, Any]]:
        """Every member's run records, keyed ``<run id>@<store tag>`` as a merge keys them."""
        out: dict[str, dict[str, Any]] = {}
        for member in self._members:
            tag = self._tags[member.path]
            out.update({carried_run_key(k, tag): v for k, v in member.runs().items()})
        return out

    # -- lookups -------------------------------------------------------------------------

    def _found(self, record_ids: list[str]) -> list[tuple[bytes, np.ndarray, int] | None]:
        """Per id: (digest, array, member index) from the first member holding it, or None;
        StoreMismatchError when two members map it to different sequences."""
        keys = [codec.encode_id(rid) for rid in record_ids]
        found: list[tuple[bytes, np.ndarray, int] | None] = [None] * len(keys)
        for index, member in enumerate(self._members):
            def work(txn: lmdb.Transaction, m: EmbeddingStore = member) -> list[tuple]:
                hits = []
                for i, key in enumerate(keys):
                    value = txn.get(key, db=m._ids_db)
                    if value is not None:
                        digest = codec.value_digest(value)
                        array = m._array(txn, digest, record_ids[i]) if found[i] is None else None
                        hits.append((i, digest, array))
                return hits

            for i, digest, array in member._env.read(work):
                hit = found[i]
                if hit is None:
                    found[i] = (digest, array, index)
                elif hit[0] != digest:
                    raise self._conflict(record_ids[i], hit[2], hit[0], index, digest)
        return found

    def _conflict(self, record_id: str, a: int, digest_a: bytes, b: int,
                  digest_b: bytes) -> StoreMismatchError:
        return StoreMismatchError(
            f"record id {record_id!r} of table {self._spec.name!r} names different sequences "
            f"in {self._members[a].path} (digest {digest_a.hex()}) and "
            f"{self._members[b].path} (digest {digest_b.hex()}); an id must name one "
            "sequence (a merge of these stores would refuse it too)")

    def _missing(self, record_id: str) -> KeyError:
        return KeyError(f"record id {record_id!r} is not in {self._name} "
                        f"table {self._spec.name!r}")

    def __getitem__(self, record_id: str) -> np.ndarray:
        hit = self._found([record_id])[0]
        if hit is None:
            raise self._missing(record_id)
        return hit[1]

    def get(self, record_id: str, default: Any = None) -> Any:
        """The array of ``record_id``, or ``default``."""
        hit = self._found([record_id])[0]
        return default if hit is None else hit[1]

    def __contains__(self, record_id: object) -> bool:
        return any(record_id in member for member in self._members)

    def get_many(self, record_ids: Iterable[str], *,
                 missing: str = "raise") -> np.ndarray | list[np.ndarray]:
        """As :meth:`EmbeddingStore.get_many`, over the members (one read transaction per
        member)."""
        if missing not in ("raise", "skip"):
            raise ValueError(f"missing must be 'raise' or 'skip', got {missing!r}")
        if isinstance(record_ids, str):
            raise TypeError("get_many takes a sequence of ids, not one id string")
        ids = list(record_ids)
        arrays = []
        for rid, hit in zip(ids, self._found(ids)):
            if hit is not None:
                arrays.append(hit[1])
            elif missing == "raise":
                raise self._missing(rid)
        if self._output.per_token:
            return arrays
        if not arrays:
            return np.empty((0, self._spec.dim), dtype=self._dtype)
        return np.stack(arrays)

    # -- iteration -----------------------------------------------------------------------

    def _stream(self, member: EmbeddingStore, arrays: bool) -> Iterator[tuple]:
        """(key, member order, id, digest, array or None) of one member, in key order."""
        order = self._members.index(member)
        return ((key, order, rid, digest, array)
                for key, rid, digest, array in member._entries(arrays, digests=True))

    def _scan(self, arrays: bool) -> Iterator[tuple[str, np.ndarray | None]]:
        merged = heapq.merge(*(self._stream(m, arrays) for m in self._members),
                             key=lambda item: (item[0], item[1]))
        for _, group in itertools.groupby(merged, key=first):
            head = next(group)
            for other in group:
                if other[3] != head[3]:
                    raise self._conflict(head[2], head[1], head[3], other[1], other[3])
            yield head[2], head[4]

    def __len__(self) -> int:
        """Distinct record ids of the table over the members (a pass over their ids)."""
        if len(self._members) == 1:
            return len(self._members[0])
        return sum(1 for _ in self._scan(arrays=False))

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Release every member (idempotent)."""
        for member in getattr(self, "_members", []):
            member.close()

    def __repr__(self) -> str:
        return (f"MultiStore({self._name!r}, table={self._spec.name!r}, "
                f"output={self._output.label!r})")


def stores_info(paths: StorePaths, *, table: str | None = None) -> dict[str, Any]:
    """What ``gpuengine info`` shows for several stores: per table, its spec (refused as a
    merge refuses tables that differ) and the record and embedding counts summed over the
    stores (an id held by two stores counts twice; the shards of one sharded run hold each
    id once), and per store its path, shard labels, counts and size."""
    members = expand_stores(paths) or [os.fspath(paths)]  # type: ignore[arg-type]
    snaps = _snapshots(members)
    try:
        names = list(dict.fromkeys(t for s in snaps for t in s.tables))
        if table is not None:
            _pick_table(names, table, _label(paths, members))
            names = [table]
        tables = {}
        for name in names:
            holders = [s for s in snaps if name in s.specs]
            tables[name] = {
                "spec": _union_spec(name, snaps).to_json(),
                "records": sum(s.counts[name]["ids"] for s in holders),
                "embeddings": sum(s.counts[name]["emb"] for s in holders),
                "stores": len(holders)}
        stores = [{"path": s.path, "shards": ", ".join(s.shard_labels()) or "none recorded",
                   "created_at": s.record.get("created_at"),
                   "records": {n: s.counts[n]["ids"] for n in names if n in s.counts},
                   "file_size": _file_size(s.path)} for s in snaps]
    finally:
        for snap in snaps:
            snap.close()
    labels = [label for s in snaps for label in s.shard_labels()]
    return {"stores": len(members), "reader_engine_version": __version__,
            "counts": "summed over the stores", "missing_shards": missing_shards(labels),
            "tables": tables, "members": stores,
            "file_size": sum(s["file_size"] for s in stores)}


def missing_shards(labels: list[str]) -> str:
    """The ``I/N`` shards of a sharded run that none of ``labels`` names (``"none"``), or
    ``"unknown"`` when the labels are not all ``I/N`` of one N."""
    if not labels:
        return "no shard labels recorded"
    try:
        parts = [tuple(int(x) for x in label.split("/")) for label in labels]
    except ValueError:
        return "unknown"
    counts = {count for _, count in parts}
    if len(counts) != 1 or any(len(p) != 2 for p in parts):
        return "unknown"
    count = counts.pop()
    missing = sorted(set(range(count)) - {index for index, _ in parts})
    return ", ".join(f"{i}/{count}" for i in missing) or "none"


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(os.path.join(path, "data.mdb"))
    except OSError:
        return 0
