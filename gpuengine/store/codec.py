"""Byte encodings of the store: sequence digests, record-id keys and arrays.

* ``sequence_digest(seq)`` is ``blake2b(seq.encode("utf-8"), digest_size=16)``.
* A record id is its UTF-8 bytes when they fit an LMDB key (511 bytes); a longer id is
  ``b"\\xff" + blake2b-16(utf8)``. ``0xFF`` never occurs in UTF-8, so the two forms cannot
  collide. The value under an id key is the 16-byte sequence digest, followed by the full
  UTF-8 id for long ids, so iterating the ids database recovers every id.
* Arrays are raw little-endian IEEE floats in C order: ``(dim,)`` for pooled outputs,
  ``(residues, dim)`` for per-token ones (the row count follows from the byte length).
"""

from __future__ import annotations

import functools
import hashlib
import operator
from collections.abc import Sequence

import numpy as np

from gpuengine.errors import StoreError
from gpuengine.store.schema import STORE_DTYPES, blake2b16

DIGEST_SIZE = 16
MAX_KEY_SIZE = 511
"""LMDB 0.9's maximum key size in bytes."""
LONG_ID_PREFIX = b"\xff"

_NUMPY_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def sequence_digest(seq: str) -> bytes:
    """16-byte blake2b digest of the sequence's UTF-8 bytes (sequences are upper-case)."""
    return blake2b16(seq.encode("utf-8"))


def sequence_digests(seqs: Sequence[str]) -> list[bytes]:
    """:func:`sequence_digest` of many sequences, in one loop."""
    blake2b = hashlib.blake2b
    return [blake2b(seq.encode("utf-8"), digest_size=16).digest() for seq in seqs]


def embedding_keys(prefix: bytes, seq_digests: Sequence[bytes]) -> list[bytes]:
    """Embedding keys of many digests, ``blake2b-16(prefix + digest)`` each (the prefix is
    :meth:`~gpuengine.store.schema.TableSpec.embedding_key_prefix`), with no interpreter
    step per key: the input processes compute them for the store writer."""
    hashes = map(_blake2b16_of, map(prefix.__add__, seq_digests))
    return list(map(_digest_of, hashes))


_blake2b16_of = functools.partial(hashlib.blake2b, digest_size=16)
_digest_of = operator.methodcaller("digest")


def sorted_by_key(pairs: list[tuple[bytes, object]]) -> list[tuple[bytes, object]]:
    """``pairs`` sorted by key, stably, as ``sorted(pairs, key=itemgetter(0))``; 16-byte keys
    (embedding keys) are sorted by numpy as two big-endian words, with no comparison in the
    interpreter."""
    keys = list(map(_key, pairs))
    if len(pairs) < 2 or set(map(len, keys)) != {16}:
        return sorted(pairs, key=_key)
    words = np.frombuffer(b"".join(keys), ">u8").reshape(-1, 2)
    order = np.lexsort((words[:, 1], words[:, 0]))  # stable: equal keys keep their order
    return list(map(pairs.__getitem__, order.tolist()))


_key = operator.itemgetter(0)


def _id_bytes(record_id: str) -> bytes:
    if not isinstance(record_id, str) or not record_id:
        raise ValueError(f"a record id must be a non-empty string, got {record_id!r}")
    try:
        return record_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"record id {record_id!r} cannot be encoded as UTF-8: {exc}") from exc


def encode_id(record_id: str) -> bytes:
    """Key of ``record_id`` in ``ids:<table>`` (see the module docstring)."""
    raw = _id_bytes(record_id)
    if len(raw) <= MAX_KEY_SIZE:
        return raw
    return LONG_ID_PREFIX + blake2b16(raw)


def encode_id_value(record_id: str, seq_digest: bytes) -> bytes:
    """Value stored under :func:`encode_id`: the digest, plus the full id for long ids."""
    if len(seq_digest) != DIGEST_SIZE:
        raise ValueError(f"a sequence digest is {DIGEST_SIZE} bytes, got {len(seq_digest)}")
    raw = _id_bytes(record_id)
    if len(raw) <= MAX_KEY_SIZE:
        return bytes(seq_digest)
    return bytes(seq_digest) + raw


def encode_id_pair(record_id: str, seq_digest: bytes) -> tuple[bytes, bytes]:
    """``(encode_id(record_id), encode_id_value(record_id, seq_digest))``, encoding once."""
    raw = _id_bytes(record_id)
    if len(raw) <= MAX_KEY_SIZE:
        return raw, seq_digest
    return LONG_ID_PREFIX + blake2b16(raw), bytes(seq_digest) + raw


def encode_id_pairs(record_ids: Sequence[str],
                    seq_digests: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    """:func:`encode_id_pair` of each (id, digest), with no interpreter step per id when
    every id is a non-empty string whose UTF-8 fits a key (the usual case)."""
    try:
        raw = list(map(str.encode, record_ids))  # UTF-8, strict
    except (TypeError, UnicodeEncodeError):
        raw = None
    if raw is None or (raw and (min(map(len, raw)) == 0 or max(map(len, raw)) > MAX_KEY_SIZE)):
        return list(map(encode_id_pair, record_ids, seq_digests))
    return list(zip(raw, seq_digests))


def value_digest(value: bytes | memoryview) -> bytes:
    """The sequence digest held by an ids-database value."""
    if len(value) < DIGEST_SIZE:
        raise StoreError(f"corrupt id record: {len(value)} bytes, expected at least {DIGEST_SIZE}")
    return bytes(value[:DIGEST_SIZE])


def decode_id(key: bytes | memoryview, value: bytes | memoryview) -> str:
    """Recover the record id from an ids-database key and value."""
    key = bytes(key)
    if not key.startswith(LONG_ID_PREFIX):
        return key.decode("utf-8")
    raw = bytes(value[DIGEST_SIZE:])
    if len(value) <= DIGEST_SIZE or blake2b16(raw) != key[1:]:
        raise StoreError(f"corrupt long-id record under key {key.hex()}")
    return raw.decode("utf-8")


def numpy_dtype(store_dtype: str) -> np.dtype:
    """The little-endian numpy dtype of a store dtype name."""
    try:
        return _NUMPY_DTYPES[store_dtype]
    except KeyError:
        raise ValueError(
            f"store dtype must be one of {', '.join(STORE_DTYPES)}; got {store_dtype!r}"
        ) from None


def encode_array(a: np.ndarray, store_dtype: str) -> bytes:
    """Cast to the store dtype and return the little-endian C-order bytes (1-D or 2-D)."""
    dtype = numpy_dtype(store_dtype)
    arr = np.asarray(a)
    if arr.ndim not in (1, 2):
        raise ValueError(
            f"an embedding is 1-D (dim,) or 2-D (residues, dim); got shape {arr.shape}"
        )
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"an embedding must hold numbers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=dtype).tobytes()


def decode_array(
    buf: bytes | memoryview, store_dtype: str, dim: int, *, per_token: bool = False
) -> np.ndarray:
    """Copy an array out of ``buf``: shape ``(dim,)``, or ``(rows, dim)`` when ``per_token``.

    Raises StoreError when the byte length does not fit (not a whole number of rows, empty,
    or more than one row for a pooled vector).
    """
    dtype = numpy_dtype(store_dtype)
    nbytes = memoryview(buf).nbytes
    row = dim * dtype.itemsize
    if nbytes == 0 or nbytes % row:
        raise StoreError(
            f"corrupt embedding: {nbytes} bytes is not a whole number of rows of "
            f"{dim} {store_dtype} values ({row} bytes)"
        )
    rows = nbytes // row
    if not per_token and rows != 1:
        raise StoreError(
            f"corrupt embedding: {nbytes} bytes for a pooled vector of {dim} {store_dtype} values"
        )
    flat = np.frombuffer(buf, dtype=dtype).copy()
    return flat.reshape(rows, dim) if per_token else flat


class Packed16(Sequence[bytes]):
    """``n`` 16-byte values (a batch's embedding keys) as one ``bytes`` of ``16 n``: built,
    split by part (:meth:`take`) and written down a pipe with no object per value. Indexing
    and iterating give the values as ``bytes``, as a list of them would (:meth:`unpacked`
    makes that list in C, for the writer's own encoder)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        if type(data) is not bytes or len(data) % DIGEST_SIZE:
            raise ValueError(f"Packed16 holds a multiple of {DIGEST_SIZE} bytes, got "
                             f"{type(data).__name__} of {len(data)}")
        self.data = data

    def __len__(self) -> int:
        return len(self.data) // DIGEST_SIZE

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return Packed16(self.data[start * DIGEST_SIZE:max(start, stop) * DIGEST_SIZE])
            return Packed16(b"".join(self.unpacked()[index]))
        at = index + len(self) if index < 0 else index
        if not 0 <= at < len(self):
            raise IndexError("Packed16 index out of range")
        return self.data[at * DIGEST_SIZE:(at + 1) * DIGEST_SIZE]

    def __iter__(self):
        return iter(self.unpacked())

    def __eq__(self, other) -> bool:
        if type(other) is Packed16:
            return self.data == other.data
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Packed16({len(self)} values)"

    def unpacked(self) -> list[bytes]:
        """The values as a list of ``bytes`` (numpy: no interpreter step per value)."""
        return np.frombuffer(self.data, _V16).tolist()

    def take(self, rows: np.ndarray) -> Packed16:
        """The values of ``rows`` (an index array), in that order."""
        return Packed16(np.frombuffer(self.data, _V16)[rows].tobytes())


_V16 = np.dtype("V16")


def unpack16(data) -> list[bytes]:
    """16-byte values packed in ``data`` (bytes-like, a multiple of 16 bytes) as a list of
    ``bytes``, with no interpreter step per value."""
    return np.frombuffer(data, _V16).tolist()


def partition_of(digest: bytes, count: int) -> int:
    """The partition (0..count-1) of a 16-byte sequence digest among ``count``: its first 8
    bytes read as a little-endian unsigned integer, modulo ``count``. The one definition of
    both ``--shard I/N`` (:mod:`gpuengine.shards`) and a run's part stores
    (:mod:`gpuengine.store.parts`), so a sequence's shard and part follow the same rule."""
    return int.from_bytes(digest[:8], "little") % count


def partitions_of(digests: Sequence[bytes], count: int) -> np.ndarray:
    """:func:`partition_of` of many digests at once (an int64 array)."""
    if not digests:
        return np.zeros(0, dtype=np.int64)
    return packed_partitions_of(b"".join(digests), count)


def packed_partitions_of(packed: bytes, count: int) -> np.ndarray:
    """:func:`partitions_of` of digests packed in one ``bytes`` (16 bytes each)."""
    low = np.frombuffer(packed, dtype="<u8").reshape(-1, 2)[:, 0]
    return (low % np.uint64(count)).astype(np.int64)
