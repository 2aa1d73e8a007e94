"""The single writer thread: the only code that writes the store during a run.

Groups of :class:`~gpuengine.store.writer.CommitRows` (a batch's sequences) and
:class:`~gpuengine.store.writer.CommitEntry` (aliases) arrive on a queue in the order the engine
produced them; each transaction holds vectors, id mappings and the run's progress counters.
Only after the transaction is durable are the counters the progress bar reads advanced, and
the digests released from the ledger's *committing* set.

Group commit: when groups wait in the queue (the store's disk is slower than the devices),
one transaction takes all of them, up to ``max_bytes`` of vectors. A transaction's fixed cost
(two fsyncs, tens of milliseconds on a virtual disk) is then paid once for many groups, so
the writer catches up instead of falling further behind; when it keeps up, each group is
its own transaction and nothing waits longer than before.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from gpuengine.ledger import Ledger
from gpuengine.store.writer import (
    CommitPart,
    StoreWriter,
    embedded_digests,
    group_nbytes,
)

MAX_TRANSACTION_BYTES = 256 << 20
"""Vectors one transaction takes at most when it merges waiting groups (a single group may
be larger) while its table holds up to 2^20 entries: LMDB keeps a transaction's dirty
pages in memory until it commits. See :func:`transaction_bytes` for larger tables."""

TABLE_ENTRIES_AT_MAX = 1 << 20
"""Entries a table holds before its transactions may merge more than ``max_bytes``: beyond,
as much more as the table is larger (256 bytes of vectors an entry at the default
``max_bytes``), up to ``GROWTH_LIMIT × max_bytes``. Every transaction copies each leaf page
its random keys touch, nearly one a key in a large table, so merging more as the table grows
writes fewer bytes a vector (docs/benchmarks.md, "The store's table growing")."""
GROWTH_LIMIT = 4


def transaction_bytes(max_bytes: int, table_entries: int) -> int:
    """Vector bytes a transaction merges waiting groups up to, for a table of
    ``table_entries``: ``max_bytes`` up to :data:`TABLE_ENTRIES_AT_MAX` entries, then in
    proportion to the table, up to ``GROWTH_LIMIT`` times as much."""
    growth = min(max(1.0, table_entries / TABLE_ENTRIES_AT_MAX), GROWTH_LIMIT)
    return int(max_bytes * growth)


log = logging.getLogger(__name__)


@dataclass
class CommitCounts:
    transactions: int = 0
    sequences: int = 0
    """Entries committed with vectors (each distinct sequence once)."""
    records: int = 0
    """Record ids committed (aliases included)."""
    groups: int = 0
    """Groups handed in and committed (``groups - transactions`` were merged into others)."""
    busy_seconds: float = 0.0
    """Time spent encoding, writing and syncing transactions."""


class Committer(threading.Thread):
    def __init__(self, writer: StoreWriter, table: str, run_id: str, ledger: Ledger, *,
                 max_bytes: int = MAX_TRANSACTION_BYTES):
        super().__init__(name="gpuengine-committer", daemon=True)
        self.writer = writer
        self.table = table
        self.run_id = run_id
        self.ledger = ledger
        self.max_bytes = max_bytes
        self.inbox: queue.Queue[tuple[list[CommitPart], dict | None] | None] = queue.Queue(maxsize=64)
        self.counts = CommitCounts()
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def put(self, group: list[CommitPart], extra_runs: dict[str, dict] | None = None) -> None:
        """Queue a group (and run records to write in the same transaction)."""
        if group or extra_runs:
            self.inbox.put((group, extra_runs))

    def finish(self) -> None:
        """Commit everything queued, then stop (blocks until done)."""
        self.inbox.put(None)
        self.join()

    def wait_idle(self) -> None:
        """Block until every group queued so far is committed (or, after a failure, dropped):
        then :meth:`snapshot` counts all of them."""
        self.inbox.join()

    def run(self) -> None:
        entries = self.writer.lookup(self.table)  # the table is open once the thread runs
        done = False
        while not done:
            item = self.inbox.get()
            if item is None:
                self.inbox.task_done()
                return
            taken = 1
            group, extra_runs = list(item[0]), dict(item[1] or {})
            groups, nbytes = 1, group_nbytes(group)
            limit = transaction_bytes(self.max_bytes, entries.embedding_count())
            while nbytes < limit:  # merge what else is waiting (group commit)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
                taken += 1
                if item is None:
                    done = True
                    break
                group.extend(item[0])
                extra_runs.update(item[1] or {})  # later run records supersede earlier ones
                groups, nbytes = groups + 1, nbytes + group_nbytes(item[0])
            if self.error is None:  # after a failure, drain without writing
                self._commit(group, extra_runs or None, groups)
            for _ in range(taken):
                self.inbox.task_done()

    def _commit(self, group: list[CommitPart], extra_runs: dict | None, groups: int) -> None:
        started = time.perf_counter()
        try:
            sequences, records = self.writer.commit(self.table, group, run_id=self.run_id,
                                                    extra_runs=extra_runs)
        except BaseException as exc:
            log.error("commit failed: %s", exc)
            self.error = exc
            return
        with self._lock:
            self.counts.transactions += 1
            self.counts.groups += groups
            self.counts.sequences += sequences
            self.counts.records += records
            self.counts.busy_seconds += time.perf_counter() - started
        self.ledger.committed(embedded_digests(group))

    def snapshot(self) -> CommitCounts:
        with self._lock:
            return CommitCounts(**vars(self.counts))
