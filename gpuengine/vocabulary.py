"""The words every layer of gpuengine shares, defined once (torch-free, numpy-free).

The allowed compute precisions, pooling modes and store dtypes, the rule for table names and
the default table, and the timestamp format of every record the engine and the daemon write.
The configuration validates against these, the store's schema records them, the runner maps
precisions to torch dtypes, and the CLI checks ``--table`` with :func:`check_table_name`
before any work. Nothing here imports another gpuengine module but :mod:`gpuengine.errors`.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from gpuengine.errors import UsageError

PRECISION_DTYPES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
                                    "fp8": "float16"}
"""Compute precisions of the model forward and the torch dtype (by name) each computes in:
the dtype the model is built in and its activations are kept in. ``fp8`` (ESM-2 on GPUs of
compute capability 8.9 or newer) runs the layers' GEMMs on e4m3 operands around an fp16
residual stream (:mod:`gpuengine.models.fp8`)."""
PRECISIONS: tuple[str, ...] = tuple(PRECISION_DTYPES)
"""``fp32``, ``fp16``, ``bf16``, ``fp8`` (``TableSpec.precision``, ``--precision``)."""
PRECISION_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 2}
"""Bytes of one activation value in each precision (token-budget estimates without torch)."""
GUARDED_PRECISIONS: tuple[str, ...] = ("fp8",)
"""Lossy precisions (beyond rounding): a run first measures one against fp16 on a sample of
its own input and refuses below ``--fp8-min-cosine`` (:mod:`gpuengine.fidelity`)."""
FP8_MIN_COSINE = 0.99
"""Default of ``--fp8-min-cosine``: the lowest min cosine to fp16 a guarded run accepts."""
POOLS: tuple[str, ...] = ("mean", "bos", "per-token")
"""Pooling modes of an output (``OutputSpec.pool``, ``--pool``)."""
STORE_DTYPES: tuple[str, ...] = ("float16", "float32")
"""How vectors are stored (``TableSpec.store_dtype``, ``--store-dtype``)."""

DEFAULT_TABLE = "default"
"""The table a run writes to when ``--table`` is not given."""
TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""A table name: 1-64 ASCII letters, digits, ``_``, ``.`` or ``-`` (it is part of LMDB
database names and of file names the tools derive)."""


def is_table_name(name: object) -> bool:
    return isinstance(name, str) and TABLE_NAME.fullmatch(name) is not None


def check_table_name(name: object, option: str = "--table") -> None:
    """UsageError naming ``option`` unless ``name`` follows :data:`TABLE_NAME`."""
    if not is_table_name(name):
        raise UsageError(f"{option} {name!r}: a table name is 1-64 characters of letters, "
                         "digits, '_', '.' and '-'")


def utc_now() -> str:
    """Current UTC time as ISO 8601 with milliseconds (every ``*_at`` field of a record)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
