"""Several store writer processes in parallel, one per part store (``embed --writers N``).

One LMDB environment has one writer, and one writer process was the host pipeline's limit on
many cores (the engine waited for it). :class:`PartedCommitter` has the committer's interface
(``start``, ``put``, ``wait_idle``, ``finish``, ``snapshot``, ``error``, ``is_alive``) and
drives N :class:`~gpuengine.writer_process.CommitterProcess` es, one per part store of the run
(:mod:`gpuengine.store.parts`): :func:`split_group` cuts each group the engine hands over into
N sub-groups by the sequences' parts (numpy on the digests; a batch's rows ordered by part
once, each column taken once in that order and sliced per part: no step per row in the
interpreter), each part's writer process encodes and commits its own, and a group's
sequences are released from the ledger once every part has committed its share durably (so a
sequence is done only once the writer of ITS part has committed it; the release, one per
group, needs no list of each share's digests). The parts commit independently (a kill -9 at any moment leaves each part with whole commits; a rerun finds
every sequence done in its part and resumes the rest).

A group counts as committed (``snapshot().groups``) once every part has committed its share.
Run records that must share the transaction of the run's last embeddings (the daemon's job
records) cannot be split over parts: such runs keep one part (the daemon, ``predict``).
If a part's writer process dies, the run stops with its StoreError (exit 1); the other parts
commit what they were sent and every child is reaped (:meth:`finish`).
"""

from __future__ import annotations

import operator
import os
import threading
from collections import deque
from collections.abc import Sequence
from itertools import chain

import numpy as np

from gpuengine.committer import CommitCounts
from gpuengine.errors import InternalError
from gpuengine.store.codec import Packed16, packed_partitions_of
from gpuengine.store.commit_group import (CommitEntry, CommitPart, CommitRows,
                                          embedded_digest_lists)
from gpuengine.store.parts import part_of
from gpuengine.store.schema import TableSpec
from gpuengine.writer_process import CommitterProcess


def _take(values: Sequence, rows: list[int]) -> list:
    """``[values[r] for r in rows]`` in C."""
    if len(rows) == 1:
        return [values[rows[0]]]
    return list(operator.itemgetter(*rows)(values))


def _split_rows(rows: CommitRows, count: int, out: list[list[CommitPart]]) -> None:
    """A batch's rows by part, column-wise: the rows ordered by part (a stable sort: each
    part's rows keep the batch's order), each column taken once in that order, then each
    part's share is a slice of every column (a view of a stacked array). A share's digests
    are packed (:class:`~gpuengine.store.codec.Packed16`): its writer process sends them as
    they are, and the ledger hears of them from the whole group's digests
    (:meth:`PartedCommitter._settle`)."""
    if not len(rows):
        return
    packed = rows.packed_digests()
    owners = packed_partitions_of(packed, count)
    first = int(owners[0])
    if (owners == first).all():  # one part holds the whole batch: as it is
        out[first].append(rows)
        return
    order = np.argsort(owners.astype(np.uint8) if count <= 256 else owners, kind="stable")
    bounds = [0, *np.cumsum(np.bincount(owners, minlength=count)).tolist()]
    at = order.tolist()
    digests, ids = Packed16(packed).take(order), _take(rows.record_ids, at)
    keys = [k.take(order) if type(k) is Packed16 else _take(k, at) for k in rows.embedding_keys]
    vectors = {o: (np.take(v, order, axis=0) if type(v) is np.ndarray else _take(v, at))
               for o, v in rows.vectors.items()}
    for index in range(count):
        lo, hi = bounds[index], bounds[index + 1]
        if lo < hi:  # cut from checked rows: no need to check them again
            out[index].append(CommitRows.of_checked(
                digests[lo:hi], ids[lo:hi], {o: v[lo:hi] for o, v in vectors.items()},
                tuple(k[lo:hi] for k in keys)))


def split_group(group: Sequence[CommitPart], count: int) -> list[list[CommitPart]]:
    """The group's sequences (with their ids and vectors) and aliases by part: ``count``
    sub-groups, each in the group's order (an alias after its sequence's vectors, as the
    group had it)."""
    out: list[list[CommitPart]] = [[] for _ in range(count)]
    for part in group:
        if type(part) is CommitRows:
            _split_rows(part, count, out)
        elif type(part) is CommitEntry:
            out[part_of(part.seq_digest, count)].append(part)
        else:
            raise InternalError(f"a commit group holds {type(part).__name__}")
    return out


class PartedCommitter:
    """The writers of a run's N part stores, one child process each; see the module
    docstring. Use as :class:`~gpuengine.committer.Committer`: :meth:`start`, :meth:`put`
    groups, then always :meth:`finish` (it reaps every child on every path)."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], spec: TableSpec, run_id: str,
                 ledger, *, map_sizes: Sequence[int]):
        if len(paths) < 2 or len(map_sizes) != len(paths):
            raise InternalError(f"PartedCommitter of {len(paths)} parts and "
                                f"{len(map_sizes)} map sizes")
        self.count = len(paths)
        self.ledger = ledger
        self.writers = [CommitterProcess(path, spec, run_id, _PartCommits(self), map_size=size)
                        for path, size in zip(paths, map_sizes)]
        self._lock = threading.Lock()
        self._waiting: deque[tuple[list[tuple[int, int]], list[Sequence[bytes]]]] = deque()
        """Per group put and not yet committed: (part, that part's group number) pairs, and
        the group's embedded digests (its digest columns) to release once all are."""
        self.sent = [0] * self.count
        """Sub-groups handed to each part's writer."""
        self._groups = 0
        """Groups every part of which is committed."""

    @property
    def error(self) -> BaseException | None:
        for writer in self.writers:
            if writer.error is not None:
                return writer.error
        return None

    def start(self) -> None:
        started = []
        try:
            for writer in self.writers:
                writer.start()
                started.append(writer)
        except BaseException:
            for writer in started:
                writer.finish()
            raise

    def is_alive(self) -> bool:
        return any(writer.is_alive() for writer in self.writers)

    def put(self, group: list[CommitPart], extra_runs: dict[str, dict] | None = None) -> None:
        """Split the group by part and queue each part's share with its writer."""
        if extra_runs:
            raise InternalError("run records to commit with a group cannot be split over "
                                f"{self.count} part stores; such runs write one store")
        if not group:
            return
        split = split_group(group, self.count)
        shares = []
        for index, share in enumerate(split):
            if share:
                self.sent[index] += 1
                shares.append((index, self.sent[index]))
        with self._lock:  # before any part can acknowledge it
            self._waiting.append((shares, embedded_digest_lists(group)))
        for index, share in enumerate(split):
            if share:
                self.writers[index].put(share)

    def wait_idle(self) -> None:
        for writer in self.writers:
            writer.wait_idle()

    def finish(self) -> None:
        """Commit everything queued in every part, then stop every child (idempotent)."""
        for writer in self.writers:  # each commits alone meanwhile: the wait is the longest
            writer.finish()

    def _settle(self) -> None:
        """Count each group (oldest first) every part of which is committed, and release its
        digests from the ledger: a sequence is done once the writer of its part has committed
        it durably (a group's digests wait for its slowest part: later, never earlier)."""
        parts = [writer.snapshot().groups for writer in self.writers]
        columns: list[Sequence[bytes]] = []
        with self._lock:
            while self._waiting and all(parts[i] >= n for i, n in self._waiting[0][0]):
                columns.extend(self._waiting.popleft()[1])
                self._groups += 1
        if columns:
            self.ledger.committed(chain.from_iterable(columns))

    def snapshot(self) -> CommitCounts:
        self._settle()
        parts = [writer.snapshot() for writer in self.writers]
        with self._lock:
            groups = self._groups
        return CommitCounts(transactions=sum(p.transactions for p in parts),
                            sequences=sum(p.sequences for p in parts),
                            records=sum(p.records for p in parts), groups=groups,
                            busy_seconds=sum(p.busy_seconds for p in parts))


class _PartCommits:
    """What a part's writer process reports its durable commits to, in place of the ledger:
    the digests of its share are ignored (its share's are packed), and the parted committer
    settles the groups all of whose parts are committed (:meth:`PartedCommitter._settle`)."""

    def __init__(self, parted: PartedCommitter):
        self.parted = parted

    def committed(self, digests) -> None:
        self.parted._settle()
