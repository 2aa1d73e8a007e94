"""Work items and packed batches (torch-free).

A :class:`WorkItem` is one distinct sequence to embed: its token ids (specials included) and the
digest that identifies it in the store. A :class:`PackedBatch` is what a device runs: the items'
ids concatenated with no padding, their token lengths and the longest length. Packing is a pure
function of the items so that the scheduler (which decides *which* items) and the device
worker (which packs them into its own pinned buffers) stay apart.

Token accounting: a batch's cost is its real token count, BOS/EOS included (packed attention
does no work on padding). Devices on the exact padded path count ``N × max_len`` instead; see
:func:`batch_cost`. Example: items of 50, 52 and 100 residues are 52 + 54 + 102 = 208 packed
tokens, or 3 × 102 = 306 padded tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True, slots=True)
class WorkItem:
    digest: bytes
    """blake2b-16 of the embedded (possibly truncated) sequence."""
    token_ids: np.ndarray
    """int32 ids, specials included."""
    residues: int
    """Residues embedded (after truncation)."""

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.size)


@dataclass(frozen=True)
class PackedBatch:
    token_ids: np.ndarray
    """int32 (T,): every item's ids, concatenated."""
    lengths: np.ndarray
    """int64 (N,): tokens per item."""
    max_len: int

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.size)


def pack(items: Sequence[WorkItem], out: np.ndarray | None = None) -> PackedBatch:
    """Concatenate the items' ids (into ``out``'s prefix when a reusable buffer is given)."""
    lengths = np.fromiter((it.n_tokens for it in items), dtype=np.int64, count=len(items))
    total = int(lengths.sum())
    if out is None or out.size < total:
        ids = np.concatenate([it.token_ids for it in items]).astype(np.int32, copy=False)
    else:
        np.concatenate([it.token_ids for it in items], out=out[:total])
        ids = out[:total]
    return PackedBatch(ids, lengths, int(lengths.max()))


def batch_cost(n_items: int, total_tokens: int, max_len: int, padded: bool) -> int:
    """Tokens a batch occupies on a device: real tokens when packed, N × max_len when padded."""
    return n_items * max_len if padded else total_tokens
