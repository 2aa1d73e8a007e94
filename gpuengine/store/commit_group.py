"""Commit groups: what the engine hands the store writer and how a group is encoded.

A group is made of :class:`CommitEntry` (one sequence: an alias, or vectors in tests) and
:class:`CommitRows` (a device batch's sequences, column-wise); :func:`group_counts`,
:func:`group_nbytes`, :func:`embedded_digests` and :func:`embedded_digest_lists` describe one
without encoding it.
:func:`encode_for_commit` validates and encodes a group into sorted key/value lists outside any
transaction (pure: no store access), so :meth:`~gpuengine.store.writer.StoreWriter.commit`
only writes them. The writer (:mod:`gpuengine.store.writer`) re-exports the public names.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any

import numpy as np

from gpuengine.errors import InternalError
from gpuengine.store import codec
from gpuengine.store.codec import Packed16
from gpuengine.store.schema import (
    OutputSpec,
    TableSpec,
    embedding_key_from_prefix,
    embedding_keys_from_prefix,
)

_ENTRY_OVERHEAD = 64
"""Rough per-record bytes of LMDB overhead, for the map-growth size hint."""


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
        digests = self.seq_digests  # checked with no step per row in the interpreter
        if n and not (list(map(type, digests)).count(bytes) == n
                      and list(map(len, digests)).count(codec.DIGEST_SIZE) == n):
            raise InternalError("CommitRows.seq_digests must all be 16-byte digests")
        if not all(self.record_ids):
            raise InternalError("CommitRows: a row names no record id")

    @classmethod
    def of_checked(cls, seq_digests: Sequence[bytes], record_ids: Sequence[tuple[str, ...]],
                   vectors: Mapping[OutputSpec, Sequence[np.ndarray]],
                   embedding_keys: Sequence[Sequence[bytes]] = ()) -> CommitRows:
        """Rows taken from rows already checked (a subset of a :class:`CommitRows`, as
        :func:`~gpuengine.writer_parts.split_group` cuts them): the same object without the
        checks again (the caller keeps every column as long as the digests)."""
        rows = object.__new__(cls)
        object.__setattr__(rows, "seq_digests", seq_digests)
        object.__setattr__(rows, "record_ids", record_ids)
        object.__setattr__(rows, "vectors", vectors)
        object.__setattr__(rows, "embedding_keys", embedding_keys)
        return rows

    def __len__(self) -> int:
        return len(self.seq_digests)

    def packed_digests(self) -> bytes:
        """The digests packed in one ``bytes`` (16 each), made once and kept: the part split
        and the writer process's frame read them. The engine loop asks as it makes the rows,
        while the digests are still in the processor's cache (made later, when a group is
        handed over, the same join waits on memory for every digest)."""
        packed = self.__dict__.get("_packed")
        if packed is None:
            digests = self.seq_digests
            packed = digests.data if type(digests) is Packed16 else b"".join(digests)
            object.__setattr__(self, "_packed", packed)
        return packed


CommitPart = CommitEntry | CommitRows
"""What a commit group is made of: single sequences (aliases, tests) and column-wise rows."""


def embedded_digests(group: Sequence[CommitPart]) -> list[bytes]:
    """Digests of the sequences a group commits vectors for (aliases excluded)."""
    out: list[bytes] = []
    for part in group:
        if type(part) is CommitRows:
            out.extend(part.seq_digests)
        elif part.vectors is not None:
            out.append(part.seq_digest)
    return out


def embedded_digest_lists(group: Sequence[CommitPart]) -> list[Sequence[bytes]]:
    """:func:`embedded_digests` as the group's own digest columns (one per part with vectors),
    chained by whoever reads them: no step per digest now (the store writer process keeps
    them until its commit is durable)."""
    return [part.seq_digests if type(part) is CommitRows else (part.seq_digest,)
            for part in group if type(part) is CommitRows or part.vectors is not None]


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


@dataclass
class EncodedGroup:
    """A commit group encoded outside the transaction; each list sorted by key (putmulti
    then walks the B-tree in order; the sort is stable, so duplicate keys keep their order).
    Made by :func:`encode_for_commit`; several merge into one transaction's with
    :func:`merge_encoded`."""

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


def encode_for_commit(spec: TableSpec, entries: Sequence[CommitPart]) -> EncodedGroup:
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
    return EncodedGroup(arrays, ids, aliases, group_counts(entries)[0], nbytes)


def merge_encoded(groups: Sequence[EncodedGroup]) -> EncodedGroup:
    """Groups encoded one by one, as one transaction's: the same lists as
    :func:`encode_for_commit` of all their entries in order (each list sorted by key, stably:
    equal keys keep the groups' order, so a later group's value is put after an earlier's)."""
    if len(groups) == 1:
        return groups[0]
    arrays = codec.sorted_by_key(list(chain.from_iterable(g.arrays for g in groups)))
    ids = sorted(chain.from_iterable(g.ids for g in groups), key=_first)
    return EncodedGroup(arrays, ids, list(chain.from_iterable(g.aliases for g in groups)),
                        sum(g.sequences for g in groups), sum(g.nbytes for g in groups))


_first, _second = operator.itemgetter(0), operator.itemgetter(1)
