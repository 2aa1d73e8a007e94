"""Export a store's table to formats other tools read: NumPy ``.npz`` and TSV."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gpuengine.errors import GpuEngineError, UsageError
from gpuengine.store.reader import EmbeddingStore
from gpuengine.store.schema import OutputSpec

FORMATS = ("npz", "tsv")


def export_store(store: str | os.PathLike, output: str | os.PathLike, fmt: str, *,
                 table: str | None = None, layer: int | None = None, pool: str | None = None) -> int:
    """Write every record of one output of a table; returns the number of records.

    ``npz``: ``ids`` (str), ``embeddings`` ((N, d) for pooled outputs; for per-token outputs the
    rows of all records concatenated, with ``offsets`` (N + 1) marking each record's rows),
    plus ``layer`` and ``pool``. ``tsv``: one line per vector row, the id then the values,
    each written so that it reads back exactly as stored.

    The file is written under a temporary name next to ``output`` and renamed when complete,
    so a failed export never leaves a partial file behind. An unwritable ``output`` raises
    GpuEngineError.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    output = Path(output)
    with EmbeddingStore(store, table=table, layer=layer, pool=pool) as emb:
        ids, arrays = [], []
        for record_id, array in emb.items():
            ids.append(record_id)
            arrays.append(array)
        out, dim = emb.output, emb.spec.dim
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as handle:
            if fmt == "npz":
                _write_npz(handle, ids, arrays, out, dim)
            else:
                _write_tsv(handle, ids, arrays, dim)
        os.replace(partial, output)
    except OSError as exc:
        raise GpuEngineError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return len(ids)


def _write_npz(handle, ids: list[str], arrays: list[np.ndarray], out: OutputSpec, dim: int) -> None:
    if out.per_token:
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([a.shape[0] for a in arrays], out=offsets[1:])
        matrix = np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float32)
        extra = {"offsets": offsets}
    else:
        matrix = np.stack(arrays) if arrays else np.zeros((0, dim), np.float32)
        extra = {}
    # A file object, not a name: given a name without ".npz", numpy would append it.
    np.savez(handle, ids=np.array(ids, dtype=str), embeddings=matrix, layer=out.layer,
             pool=out.pool, **extra)


def _write_tsv(handle, ids: list[str], arrays: list[np.ndarray], dim: int) -> None:
    for record_id, array in zip(ids, arrays):
        for row in array.reshape(-1, dim):
            # str of a numpy scalar: the shortest text that reads back as the stored value
            line = record_id + "\t" + "\t".join(map(str, row)) + "\n"
            handle.write(line.encode("utf-8"))
