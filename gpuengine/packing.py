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

from collections import namedtuple
from itertools import repeat
from typing import Iterable

import numpy as np

TOKEN_DTYPE = np.dtype("<i4")
"""How a work item's token ids are held: little-endian int32."""


class WorkItem(namedtuple("WorkItem", "digest token_bytes residues n_tokens keys")):
    """One distinct sequence to embed: ``WorkItem(digest, token_ids, residues[, keys])``.

    An immutable tuple (digest, token_bytes, residues, n_tokens, keys) whose fields read by
    name at C speed: the planner makes one per new sequence, the scheduler reads ``n_tokens``
    of each when it sorts and packs and the engine loop the digests and keys of each batch,
    so none of that may cost interpreter work per field (:meth:`many` builds a chunk's items
    without running Python code per item).

    * ``digest``: blake2b-16 of the embedded (possibly truncated) sequence;
    * ``token_bytes``: its token ids, specials included, as little-endian int32 ``bytes``
      (a slice of one copy of the chunk's token buffer costs a third of an ndarray view, to
      make and to free; a runner joins a batch's with one ``b"".join``);
      :attr:`token_ids` reads them as an int32 array; ``n_tokens``: their number;
    * ``residues``: residues embedded (after truncation);
    * ``keys``: its embedding key per output of the table, when the input side computed them
      (``blake2b-16(prefix + digest)``); else ().
    """

    __slots__ = ()

    def __new__(cls, digest: bytes, token_ids: np.ndarray, residues: int,
                keys: tuple[bytes, ...] = ()) -> WorkItem:
        ids = np.ascontiguousarray(token_ids, dtype=TOKEN_DTYPE)
        return tuple.__new__(cls, (digest, ids.tobytes(), residues, int(ids.size), keys))

    @property
    def token_ids(self) -> np.ndarray:
        """The token ids as a read-only int32 array (a view of :attr:`token_bytes`)."""
        return np.frombuffer(self.token_bytes, TOKEN_DTYPE)

    @classmethod
    def many(cls, digests: Iterable[bytes], token_bytes: Iterable[bytes],
             residues: Iterable[int], n_tokens: Iterable[int],
             keys: Iterable[tuple[bytes, ...]] | None = None) -> list[WorkItem]:
        """Items from parallel columns (``token_bytes[i]``: ``n_tokens[i]`` little-endian
        int32 ids)."""
        columns = zip(digests, token_bytes, residues, n_tokens, repeat(()) if keys is None else keys)
        return list(map(tuple.__new__, repeat(cls), columns))

    def __repr__(self) -> str:
        return (f"WorkItem(digest={self.digest.hex()}, n_tokens={self.n_tokens}, "
                f"residues={self.residues})")


def batch_cost(n_items: int, total_tokens: int, max_len: int, padded: bool) -> int:
    """Tokens a batch occupies on a device: real tokens when packed, N × max_len when padded."""
    return n_items * max_len if padded else total_tokens
