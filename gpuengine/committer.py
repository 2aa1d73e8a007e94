"""The single writer thread: the only code that writes the store during a run.

Groups of :class:`~gpuengine.store.writer.CommitRows` (a batch's sequences) and
:class:`~gpuengine.store.writer.CommitEntry` (aliases) arrive on a queue in the order the engine
produced them; each group is one LMDB transaction holding vectors, id mappings and the run's
progress counters. Only after the transaction is durable are the counters the progress bar
reads advanced, and the digests released from the ledger's *committing* set.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

from gpuengine.planner import Ledger
from gpuengine.store.writer import (
    CommitPart,
    StoreWriter,
    embedded_digests,
    group_counts,
)

log = logging.getLogger(__name__)


@dataclass
class CommitCounts:
    transactions: int = 0
    sequences: int = 0
    """Entries committed with vectors (each distinct sequence once)."""
    records: int = 0
    """Record ids committed (aliases included)."""


class Committer(threading.Thread):
    def __init__(self, writer: StoreWriter, table: str, run_id: str, ledger: Ledger):
        super().__init__(name="gpuengine-committer", daemon=True)
        self.writer = writer
        self.table = table
        self.run_id = run_id
        self.ledger = ledger
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

    def run(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain without writing after a failure
            group, extra_runs = item
            try:
                self.writer.commit(self.table, group, run_id=self.run_id, extra_runs=extra_runs)
            except BaseException as exc:
                log.error("commit failed: %s", exc)
                self.error = exc
                continue
            sequences, records = group_counts(group)
            with self._lock:
                self.counts.transactions += 1
                self.counts.sequences += sequences
                self.counts.records += records
            self.ledger.committed(embedded_digests(group))

    def snapshot(self) -> CommitCounts:
        with self._lock:
            return CommitCounts(**vars(self.counts))
