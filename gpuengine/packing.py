"""Work items and packed batches (torch-free).

A :class:`WorkItem` is one distinct sequence to embed: its token ids (specials included) and the
digest that identifies it in the store. The scheduler decides *which* items form a batch; the
device's runner concatenates their ids, with no padding, into its own pinned buffer.

Token accounting: a batch's cost is its real token count, BOS/EOS included (packed attention
does no work on padding). Devices on the exact padded path count ``N × max_len`` instead; see
:func:`batch_cost`. Example: items of 50, 52 and 100 residues are 52 + 54 + 102 = 208 packed
tokens, or 3 × 102 = 306 padded tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def batch_cost(n_items: int, total_tokens: int, max_len: int, padded: bool) -> int:
    """Tokens a batch occupies on a device: real tokens when packed, N × max_len when padded."""
    return n_items * max_len if padded else total_tokens
