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
from operator import itemgetter
from typing import Iterable, Sequence

import numpy as np

TOKEN_DTYPE = np.dtype("<i4")
"""How a work item's token ids are held: little-endian int32."""


class WorkItem(namedtuple("WorkItem", "digest token_bytes residues n_tokens keys")):
    """One distinct sequence to embed: ``WorkItem(digest, token_ids, residues[, keys])``.

    An immutable tuple (digest, token_bytes, residues, n_tokens, keys) whose fields read by
    name at C speed. A run's items travel column-wise, as an :class:`ItemBlock`, from the
    planner through the scheduler to a runner and the engine loop; a ``WorkItem`` is what a
    block gives read one by one (tests, failures, retries), and what ``check`` and the
    fidelity guard build directly.

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

    def __repr__(self) -> str:
        return (f"WorkItem(digest={self.digest.hex()}, n_tokens={self.n_tokens}, "
                f"residues={self.residues})")


_FIELDS = ("digests", "token_bytes", "residues", "n_tokens")


class ItemBlock(Sequence[WorkItem]):
    """Work items held column-wise: a list per field (``digests``, ``token_bytes``,
    ``residues``, ``n_tokens``) and ``keys``, one list per output of each item's embedding key
    (() when the items carry none). The planner makes one per chunk, the scheduler sorts,
    cuts and splits them and a batch reaches the runner and the engine loop as one, all with
    list operations in C: no object per item. Reading it as a sequence (an index, iteration)
    gives :class:`WorkItem` objects, made on demand (tests, failures, the rare retry)."""

    __slots__ = ("digests", "token_bytes", "residues", "n_tokens", "keys")

    def __init__(self, digests: list[bytes], token_bytes: list[bytes], residues: list[int],
                 n_tokens: list[int], keys: tuple[list[bytes], ...] = ()):
        self.digests, self.token_bytes, self.residues = digests, token_bytes, residues
        self.n_tokens, self.keys = n_tokens, keys

    @classmethod
    def of(cls, items: Iterable[WorkItem]) -> ItemBlock:
        """``items`` as a block (a block as it is). Keys are kept only when every item has
        the same number of them."""
        if type(items) is ItemBlock:
            return items
        items = list(items)
        if not items:
            return cls([], [], [], [])
        digests, token_bytes, residues, n_tokens, keys = map(list, zip(*items))
        widths = set(map(len, keys))
        columns = tuple(map(list, zip(*keys))) if len(widths) == 1 else ()
        return cls(digests, token_bytes, residues, n_tokens, columns)

    @classmethod
    def concat(cls, blocks: Sequence[ItemBlock]) -> ItemBlock:
        """One block of ``blocks`` in order (keys kept only when all have as many)."""
        if len(blocks) == 1:
            return blocks[0]
        out = cls([], [], [], [], ())
        for block in blocks:
            out.extend(block)
        return out

    def extend(self, other: ItemBlock) -> None:
        """``other``'s items at the back (in place; keys dropped unless both hold as many)."""
        had = len(self.digests)
        self.digests.extend(other.digests)
        self.token_bytes.extend(other.token_bytes)
        self.residues.extend(other.residues)
        self.n_tokens.extend(other.n_tokens)
        if not had and not self.keys:
            self.keys = tuple(map(list, other.keys))
        elif len(self.keys) == len(other.keys):
            for mine, theirs in zip(self.keys, other.keys):
                mine.extend(theirs)
        else:
            self.keys = ()

    def take(self, order: list[int]) -> ItemBlock:
        """The items at positions ``order``, in that order."""
        if not order:
            return ItemBlock([], [], [], [], tuple([] for _ in self.keys))
        get = itemgetter(*order)
        if len(order) == 1:
            get = _one(get)
        return ItemBlock(*(list(get(getattr(self, f))) for f in _FIELDS),
                         tuple(list(get(column)) for column in self.keys))

    def drop_front(self, n: int) -> None:
        """Forget the first ``n`` items (in place)."""
        for column in (self.digests, self.token_bytes, self.residues, self.n_tokens, *self.keys):
            del column[:n]

    def __len__(self) -> int:
        return len(self.digests)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ItemBlock(self.digests[index], self.token_bytes[index],
                             self.residues[index], self.n_tokens[index],
                             tuple(column[index] for column in self.keys))
        return tuple.__new__(WorkItem, (self.digests[index], self.token_bytes[index],
                                        self.residues[index], self.n_tokens[index],
                                        tuple(column[index] for column in self.keys)))

    def __iter__(self):
        keys = zip(*self.keys) if self.keys else repeat(())
        columns = zip(self.digests, self.token_bytes, self.residues, self.n_tokens, keys)
        return map(tuple.__new__, repeat(WorkItem), columns)

    def __eq__(self, other) -> bool:
        if isinstance(other, ItemBlock):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ItemBlock({len(self)} items, {sum(self.n_tokens)} tokens)"


def _one(get):
    """An itemgetter of one position made to answer a 1-tuple, as one of several does."""
    return lambda values: (get(values),)


def batch_cost(n_items: int, total_tokens: int, max_len: int, padded: bool) -> int:
    """Tokens a batch occupies on a device: real tokens when packed, N × max_len when padded."""
    return n_items * max_len if padded else total_tokens
