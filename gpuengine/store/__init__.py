"""The LMDB store: what embeddings mean (:mod:`.schema`), how they are encoded
(:mod:`.codec`), the shared environment (:mod:`.environment`), transactional writes
(:mod:`.writer`) of commit groups (:mod:`.commit_group`), the lookups a run makes in the
table it writes (:mod:`.lookup`) and reading (:mod:`.reader`); several stores merged
(:mod:`.merge`) or read as one (:mod:`.multi`). The layout is documented in ``docs/store.md``.

This package needs only numpy, lmdb and the standard library (no torch).
"""

from __future__ import annotations

from gpuengine.store.codec import decode_array, decode_id, encode_array, encode_id, sequence_digest
from gpuengine.store.reader import EmbeddingStore
from gpuengine.store.schema import (
    POOLS,
    RUN_STATUSES,
    SCHEMA_VERSION,
    STORE_DTYPES,
    ModelIdentity,
    OutputSpec,
    TableSpec,
)
from gpuengine.store.writer import CommitEntry, StoreWriter

__all__ = [
    "POOLS",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "STORE_DTYPES",
    "CommitEntry",
    "EmbeddingStore",
    "ModelIdentity",
    "OutputSpec",
    "StoreWriter",
    "TableSpec",
    "decode_array",
    "decode_id",
    "encode_array",
    "encode_id",
    "sequence_digest",
]
