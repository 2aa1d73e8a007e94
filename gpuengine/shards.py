"""Shards of one run's input: ``--shard I/N`` (torch-free).

A sharded run embeds only the records of its shard; the N shards of the same input are
disjoint and together hold every record exactly once, whatever machine or order they run in,
so N ordinary runs (a SLURM array, Nextflow, Snakemake) and one ``gpuengine merge`` give what
one run gives. The partition is by content, never by position:

* ``embed``: a record's shard is that of its sequence **as embedded** (after truncation to
  ``max_residues``) — the store's own key. Identical sequences land in the same shard, so a
  sequence shared by several ids is computed once, and no two shards ever hold embeddings of
  the same sequence.
* ``predict``: a read's shard is that of its whole sequence, so all its chunks and frames are
  in one shard (and identical reads in one shard too).

The shard of a sequence digest (``blake2b(sequence, digest_size=16)``, see
:func:`gpuengine.store.codec.sequence_digest`) is its first 8 bytes read as a little-endian
unsigned integer, modulo N. blake2b is uniform, so shards are balanced by record count (by
residues too, up to the spread of lengths).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from gpuengine.errors import UsageError

_LABEL = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


def shard_of(digest: bytes, count: int) -> int:
    """The shard (0..count-1) of a 16-byte sequence digest (the store's partition rule,
    :func:`gpuengine.store.codec.partition_of`, which a run's part stores follow too)."""
    from gpuengine.store.codec import partition_of

    return partition_of(digest, count)


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (0-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UsageError(f"--shard {self.index}/{self.count}: expected I/N with N >= 1 and "
                             f"0 <= I < N (shards are numbered from 0), e.g. 0/{max(self.count, 2)}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"`` → Shard; a UsageError says what is expected."""
        match = _LABEL.fullmatch(text or "")
        if match is None:
            raise UsageError(f"--shard {text!r}: expected I/N, the 0-based shard I of N shards "
                             "(e.g. 0/8 ... 7/8)")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def label(self) -> str:
        """``"I/N"``, as the run record's ``info.shard`` holds it."""
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        """``shard-IIII-of-NNNN``: how the stores and markers of a cluster run are named."""
        return shard_name(self.index, self.count)

    def holds(self, digest: bytes) -> bool:
        return shard_of(digest, self.count) == self.index

    def positions(self, digests: Sequence[bytes]) -> list[int]:
        """Positions of the digests of this shard, in order (vectorised)."""
        if not digests:
            return []
        low = np.frombuffer(b"".join(digests), dtype="<u8").reshape(len(digests), 2)[:, 0]
        return np.flatnonzero(low % np.uint64(self.count) == self.index).tolist()

    def holds_sequence(self, sequence: str) -> bool:
        """Whether ``sequence`` (as embedded) is in this shard."""
        from gpuengine.store.codec import sequence_digest

        return self.holds(sequence_digest(sequence))

    def selector(self, max_residues: int | None) -> ShardSelector:
        """``select(sequence)``: whether a record with this (untruncated) sequence is in the
        shard once truncated to ``max_residues`` (None: never truncated)."""
        return ShardSelector(self, max_residues)


@dataclass(frozen=True)
class ShardSelector:
    """A shard's membership test of sequences (:meth:`Shard.selector`); its fields say what it
    is, so a validation process can make the same one."""

    shard: Shard
    max_residues: int | None
    _test: Callable[[str], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from gpuengine.store.codec import partition_of, sequence_digest

        count, index, limit = self.shard.count, self.shard.index, self.max_residues
        if limit is None:
            test = lambda seq: partition_of(sequence_digest(seq), count) == index  # noqa: E731
        else:
            test = lambda seq: partition_of(sequence_digest(seq[:limit]), count) == index  # noqa: E731
        object.__setattr__(self, "_test", test)  # resolved once: it is asked of every record

    def __call__(self, seq: str) -> bool:
        return self._test(seq)


def shard_name(index: int, count: int) -> str:
    """``shard-0003-of-0016`` (at least 4 digits, more for 10 000 shards or more)."""
    width = max(4, len(str(count)))
    return f"shard-{index:0{width}d}-of-{count:0{width}d}"
