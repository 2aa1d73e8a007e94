"""Export a store's table to formats other tools read: NumPy ``.npz`` and TSV."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gpuengine.errors import UsageError
from gpuengine.store.reader import EmbeddingStore

FORMATS = ("npz", "tsv")


def export_store(store: str | os.PathLike, output: str | os.PathLike, fmt: str, *,
                 table: str | None = None, layer: int | None = None, pool: str | None = None) -> int:
    """Write every record of one output of a table; returns the number of records.

    ``npz``: ``ids`` (str), ``embeddings`` ((N, d) for pooled outputs; for per-token outputs the
    rows of all records concatenated, with ``offsets`` (N + 1) marking each record's rows),
    plus ``layer`` and ``pool``. ``tsv``: one line per vector row, the id then the values.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    output = Path(output)
    with EmbeddingStore(store, table=table, layer=layer, pool=pool) as emb:
        ids, arrays = [], []
        for record_id, array in emb.items():
            ids.append(record_id)
            arrays.append(array)
        per_token = emb.output.pool == "per-token"
        dim = emb.spec.dim
        if fmt == "npz":
            if per_token:
                offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
                np.cumsum([a.shape[0] for a in arrays], out=offsets[1:])
                matrix = np.concatenate(arrays) if arrays else np.zeros((0, dim), np.float32)
                extra = {"offsets": offsets}
            else:
                matrix = np.stack(arrays) if arrays else np.zeros((0, dim), np.float32)
                extra = {}
            np.savez(output, ids=np.array(ids, dtype=str), embeddings=matrix,
                     layer=emb.output.layer, pool=emb.output.pool, **extra)
        else:
            with open(output, "w", encoding="utf-8") as handle:
                for record_id, array in zip(ids, arrays):
                    for row in array.reshape(-1, dim):
                        handle.write(record_id + "\t" + "\t".join(f"{x:.7g}" for x in row) + "\n")
    return len(ids)
