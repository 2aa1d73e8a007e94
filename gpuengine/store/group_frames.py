"""A commit group as bytes, for the writer process (:mod:`gpuengine.writer_process`).

:func:`encode_group` turns a group (:class:`~gpuengine.store.commit_group.CommitRows`,
:class:`~gpuengine.store.commit_group.CommitEntry`) and its run records into a list of
buffers to write down a pipe; :func:`decode_group` turns the bytes back into the same group,
which the writer process encodes and commits as the writer thread would
(:func:`~gpuengine.store.commit_group.encode_for_commit`): the store holds the same bytes.

Layout: a little-endian uint32 header length, the header (UTF-8 JSON), then the blobs the
header points into by ``[offset, length]`` from the end of the header. No pickle, and no
interpreter step per sequence on the sending side for a device batch's rows: digests and
embedding keys travel concatenated (16 bytes each), record ids as one UTF-8 text joined by NUL
(with per-row id counts where a row has several ids), a batch's pooled vectors as its one
contiguous array. Per-row work (lists of arrays, per-token vectors, aliases) happens only where
the group already holds an object per row. Run records travel as JSON: the store writes them
with sorted keys, so they come out as the same bytes.

The header::

    {"nbytes": vectors' bytes (group_nbytes), "extra": run records or null,
     "parts": [{"k": "rows", "n": rows, "digests": at, "ids": at | {"json": [...]},
                "counts": at | null, "keys": [at per output] | null,
                "vectors": [[label, {"dtype", "shape", "at"} | {"list": [[dtype, shape, at], ...]}], ...]},
               {"k": "alias", "n": entries, "digests": at, "ids": ..., "counts": ...}, ...]}
"""

from __future__ import annotations

import json
import struct
from itertools import chain
from types import SimpleNamespace
from typing import Any, Sequence

import numpy as np

from gpuengine.errors import InternalError
from gpuengine.store.codec import Packed16, unpack16
from gpuengine.store.commit_group import CommitEntry, CommitPart, CommitRows, group_nbytes
from gpuengine.store.schema import OutputSpec

_HEAD = struct.Struct("<I")
_SEP = "\x00"


class _Blobs:
    """Buffers appended in order; ``add`` returns where one lies: [offset, length]."""

    def __init__(self) -> None:
        self.buffers: list[Any] = []
        self.size = 0

    def add(self, data: Any) -> list[int]:
        view = memoryview(data).cast("B")
        at = [self.size, view.nbytes]
        if view.nbytes:
            self.buffers.append(view)
            self.size += view.nbytes
        return at


def _ids(flat: list[str], blobs: _Blobs) -> Any:
    """Record ids as one NUL-joined UTF-8 text; as a JSON list when an id holds a NUL or is
    not a string (the writer then says what is wrong with it, as it would in-process)."""
    try:
        text = _SEP.join(flat)
    except TypeError:
        text = None
    if text is None or text.count(_SEP) != max(0, len(flat) - 1):
        try:
            return {"json": flat}
        except TypeError:  # pragma: no cover - ids are strings
            raise InternalError("a record id that is not a string in a commit") from None
    return blobs.add(text.encode("utf-8", "surrogatepass"))


def _array(array: Any) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in "fiub":
        raise ValueError(f"an embedding must hold numbers, got dtype {array.dtype}")
    return np.ascontiguousarray(array)


def _vectors(vectors: Any, blobs: _Blobs) -> dict:
    if type(vectors) is np.ndarray:
        array = _array(vectors)
        return {"dtype": array.dtype.str, "shape": list(array.shape), "at": blobs.add(array)}
    arrays = [_array(a) for a in vectors]  # rows or per-token arrays: one object per row anyway
    return {"list": [[a.dtype.str, list(a.shape), blobs.add(a)] for a in arrays]}


def _counts(record_ids: Sequence[tuple[str, ...]], flat_len: int, blobs: _Blobs) -> Any:
    n = len(record_ids)
    if flat_len == n:  # one id a row (the usual case)
        return None
    return blobs.add(np.fromiter(map(len, record_ids), "<u4", n))


def _rows_part(rows: CommitRows, blobs: _Blobs) -> dict:
    n = len(rows)
    flat = list(chain.from_iterable(rows.record_ids))
    keys = rows.embedding_keys
    return {"k": "rows", "n": n, "digests": blobs.add(rows.packed_digests()),
            "ids": _ids(flat, blobs), "counts": _counts(rows.record_ids, len(flat), blobs),
            "keys": [blobs.add(_packed(k)) for k in keys] if keys else None,
            "vectors": [[getattr(o, "label", repr(o)), _vectors(v, blobs)]
                        for o, v in rows.vectors.items()]}


def _packed(values: Sequence[bytes]) -> bytes:
    """16-byte values (a column of embedding keys) as one ``bytes``."""
    return values.data if type(values) is Packed16 else b"".join(values)


def _alias_part(entries: list[CommitEntry], blobs: _Blobs) -> dict:
    ids = [e.record_ids for e in entries]
    flat = list(chain.from_iterable(ids))
    return {"k": "alias", "n": len(entries),
            "digests": blobs.add(b"".join(e.seq_digest for e in entries)),
            "ids": _ids(flat, blobs), "counts": _counts(ids, len(flat), blobs)}


def encode_group(group: Sequence[CommitPart], extra_runs: dict | None) -> list[Any]:
    """The buffers of one group's frame payload (header length, header, blobs), in order."""
    blobs, parts = _Blobs(), []
    aliases: list[CommitEntry] = []
    for part in group:
        if type(part) is not CommitRows and part.vectors is None:
            aliases.append(part)  # consecutive aliases: one part, in the same order
            continue
        if aliases:
            parts.append(_alias_part(aliases, blobs))
            aliases = []
        if type(part) is CommitRows:
            parts.append(_rows_part(part, blobs))
        else:  # a CommitEntry with vectors (tests): one row
            parts.append(_rows_part(CommitRows((part.seq_digest,), (part.record_ids,),
                                               {o: [v] for o, v in part.vectors.items()}),
                                    blobs))
    if aliases:
        parts.append(_alias_part(aliases, blobs))
    header = json.dumps({"nbytes": group_nbytes(group), "extra": extra_runs, "parts": parts},
                        default=str).encode("utf-8")
    return [_HEAD.pack(len(header)), header, *blobs.buffers]


def split_payload(payload: memoryview | bytes | bytearray) -> tuple[dict, memoryview]:
    """(the header, the blobs) of a frame payload."""
    view = memoryview(payload)
    size, = _HEAD.unpack_from(view)
    header = json.loads(bytes(view[_HEAD.size:_HEAD.size + size]).decode("utf-8"))
    return header, view[_HEAD.size + size:]


def _at(blobs: memoryview, at: list[int]) -> memoryview:
    return blobs[at[0]:at[0] + at[1]]


def _split16(blobs: memoryview, at: list[int]) -> list[bytes]:
    if at[1] % 16:
        raise InternalError(f"a group frame's 16-byte column holds {at[1]} bytes")
    return unpack16(_at(blobs, at))


def _decode_ids(blobs: memoryview, part: dict) -> list[tuple[str, ...]]:
    ids = part["ids"]
    if isinstance(ids, dict):
        flat = ids["json"]
    elif part["n"] == 0:
        flat = []
    else:
        flat = bytes(_at(blobs, ids)).decode("utf-8", "surrogatepass").split(_SEP)
    if part["counts"] is None:
        return list(zip(flat))
    counts = np.frombuffer(_at(blobs, part["counts"]), "<u4").tolist()
    out, at = [], 0
    for count in counts:
        out.append(tuple(flat[at:at + count]))
        at += count
    return out


def _decode_array(blobs: memoryview, dtype: str, shape: list[int], at: list[int]) -> np.ndarray:
    return np.frombuffer(_at(blobs, at), np.dtype(dtype)).reshape(shape)


def _decode_vectors(blobs: memoryview, coded: dict) -> Any:
    if "list" in coded:
        return [_decode_array(blobs, *row) for row in coded["list"]]
    return _decode_array(blobs, coded["dtype"], coded["shape"], coded["at"])


def decode_group(header: dict, blobs: memoryview,
                 outputs: Sequence[OutputSpec]) -> list[CommitPart]:
    """The group a payload holds (``outputs``: the table's, to name the vectors by)."""
    by_label: dict[str, Any] = {o.label: o for o in outputs}
    group: list[CommitPart] = []
    for part in header["parts"]:
        digests = _split16(blobs, part["digests"])
        ids = _decode_ids(blobs, part)
        if part["k"] == "alias":
            group.extend(map(CommitEntry, digests, ids, [None] * len(digests)))
            continue
        vectors = {by_label.get(label) or SimpleNamespace(label=label):
                   _decode_vectors(blobs, coded) for label, coded in part["vectors"]}
        keys = tuple(_split16(blobs, at) for at in part["keys"]) if part["keys"] else ()
        group.append(CommitRows(digests, ids, vectors, keys))
    return group
