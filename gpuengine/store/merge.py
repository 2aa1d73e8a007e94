"""Merge stores into one: ``gpuengine merge OUT STORE...`` (docs/store.md, "Merging stores").

What happens, in order (nothing is written before step 4):

1. Every input store is opened read-only with one read transaction held for the whole merge
   (a consistent view of each; :class:`~gpuengine.store.sources.Snapshot`).
2. Every table's copies (the inputs' and OUT's own, when OUT holds it) must mean the same
   (:func:`~gpuengine.store.compat.combined_spec`), else StoreMismatchError.
3. Every table held by two or more stores is checked for ids that name different sequences
   (a k-way merge of the ids databases); the first one found is a StoreMismatchError naming
   the id and both stores.
4. OUT is created (or opened) with its tables, and a merge run record (key ``merge-<hash of
   the input paths>``) is written. Then each table is merged, embeddings first, then ids
   (an id is never committed before its embeddings): a k-way merge of the inputs' sorted
   databases, written in key order (``putmulti(append=True)`` where the keys fall after
   everything in OUT, plain puts without overwriting otherwise) in transactions of about
   ``transaction_bytes``. Each transaction also moves the record's resume point (the last
   key written) and counters, so after a kill a rerun of the same command continues after
   that key and ends with exactly what an uninterrupted merge writes. Into a store that
   holds nothing of its own these commits are flushed late (:mod:`.deferred`); everything is
   flushed before step 5 and before the merge returns.
5. The last transaction copies every input's run records (as ``<run id>@<store tag>``) and
   marks the merge record complete.

Before step 1 an output that an OS crash may have damaged (an unflushed deferred merge of an
earlier boot) is emptied, so that nothing reads it.

The first copy of a key wins: OUT's own, then the inputs in the order given. Embedding values
are copied as stored (no decoding); an embedding of the same sequence held by several stores
with different bytes is counted (``differing``) and the first copy kept.
"""

from __future__ import annotations

import bisect
import gc
import json
import operator
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import lmdb

from gpuengine.errors import EXIT_ERROR, EXIT_INTERRUPTED, UsageError
from gpuengine.store.deferred import (Flusher, boot_id, discard_damaged, remove_marker,
                                      write_marker)
from gpuengine.store.environment import open_store
from gpuengine.store.kway import Prefetch, block_items, first, merged_chunks
from gpuengine.store.merge_plan import (
    KINDS,
    Interrupted,
    Plan,
    id_conflict,
    make_plan,
    merge_run_id,
)
from gpuengine.store.schema import RUNS_DB, emb_db_name, ids_db_name
from gpuengine.store.sources import Snapshot, carried_run_key, expand_stores
from gpuengine.store.writer import StoreWriter, utc_now

_second = operator.itemgetter(1)
TRANSACTION_BYTES = 256 << 20
"""Default size of one merge transaction (vector bytes)."""


class MergeProgress(Protocol):
    """What the merge reports while it works (the CLI draws a bar from it)."""

    def stage(self, message: str) -> None: ...
    def start(self, what: str, total: int) -> None: ...
    def advance(self, done: int, nbytes: int = 0) -> None: ...
    def close(self) -> None: ...


class NoProgress:
    def stage(self, message: str) -> None: pass
    def start(self, what: str, total: int) -> None: pass
    def advance(self, done: int, nbytes: int = 0) -> None: pass
    def close(self) -> None: pass


class _Stoppable:
    """Passes reports on, and ends the work in progress (``Interrupted``) at the next one
    once ``stop`` is set: the id check and the verify stop between two chunks, the merge
    after the transaction it just committed."""

    def __init__(self, inner: MergeProgress, stop: threading.Event | None) -> None:
        self.inner, self.stop = inner, stop

    def stage(self, message: str) -> None:
        self.inner.stage(message)

    def start(self, what: str, total: int) -> None:
        self.inner.start(what, total)

    def advance(self, done: int, nbytes: int = 0) -> None:
        self.inner.advance(done, nbytes)
        if self.stop is not None and self.stop.is_set():
            raise Interrupted

    def close(self) -> None:
        self.inner.close()


@dataclass
class MergeSummary:
    """What a merge did (``--json`` prints :meth:`to_json`)."""

    out: str
    stores: list[str]
    run_id: str
    tables: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per table, the merge record's counters: embeddings ``emb_added``, ``emb_duplicates``
    (copies not written: the same key came first from OUT or an earlier store),
    ``emb_differing`` (of those, with other bytes), ``emb_differing_existing`` (other bytes
    than OUT's own copy), ids ``ids_added`` and ``ids_duplicates``."""
    vectors_read: int = 0
    """Embeddings read from the inputs by this invocation."""
    bytes_read: int = 0
    ids_read: int = 0
    transactions: int = 0
    seconds: float = 0.0
    merge_seconds: float = 0.0
    """Time of the embedding and id passes (what vectors/s is computed over)."""
    resumed: bool = False
    """An interrupted merge of the same inputs was continued."""
    restarted: bool = False
    """An input changed since the interrupted merge began: every pass started over."""
    already_complete: bool = False
    interrupted: bool = False
    runs_carried: int = 0
    verify: Any = None
    """A :class:`~gpuengine.store.verify.VerifyResult` when asked for."""
    verify_seconds: float = 0.0

    @property
    def vectors_per_second(self) -> float:
        return self.vectors_read / self.merge_seconds if self.merge_seconds else 0.0

    @property
    def megabytes_per_second(self) -> float:
        return self.bytes_read / self.merge_seconds / 1e6 if self.merge_seconds else 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_ERROR if self.verify is not None and not self.verify.ok else 0

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "verify"}
        data.update(vectors_per_second=self.vectors_per_second,
                    megabytes_per_second=self.megabytes_per_second)
        data["verify"] = None if self.verify is None else self.verify.to_json()
        return data


def input_paths(out: str | os.PathLike[str],
                stores: Iterable[str | os.PathLike[str]]) -> list[str]:
    """The input stores (directories of stores expanded); UsageError for none, one named
    twice, or OUT among them."""
    paths = expand_stores(list(stores))
    assert paths is not None
    real_out = os.path.realpath(os.fspath(out))
    for path in paths:
        if os.path.realpath(path) == real_out:
            raise UsageError(f"the output {os.fspath(out)} is also an input; merge into a "
                             "new or another store")
    return paths


def merge_stores(out: str | os.PathLike[str], stores: Iterable[str | os.PathLike[str]], *,
                 verify: bool = False, progress: MergeProgress | None = None,
                 transaction_bytes: int = TRANSACTION_BYTES,
                 stop: threading.Event | None = None, sync: bool = True,
                 read_ahead: bool = True, deferred: bool = True) -> MergeSummary:
    """Merge ``stores`` (paths, or directories of stores) into ``out`` (new or existing).

    Restartable: the same call after a kill continues where the last commit left off. With
    ``verify``, every vector and id mapping of every input is read again and compared with
    OUT (``summary.verify``). ``stop`` (set by a signal handler) ends the merge after the
    current transaction (``summary.interrupted``).

    ``deferred`` (the default) applies where OUT holds nothing of its own (new, empty, or
    left by an unfinished deferred merge): the passes commit without fsync, a second thread
    flushes each commit while the next is prepared, and everything is flushed before the
    merge is recorded complete or returns
    (:mod:`gpuengine.store.deferred` says why an OS crash cannot leave a damaged OUT behind
    unnoticed). Into a store with data of its own every commit is flushed before the next.
    ``sync=False`` never flushes (for measuring the disk's share: a kill is harmless, an OS
    crash may corrupt OUT); ``read_ahead`` reads the next chunk of the inputs on a second
    thread while a chunk is committed (LMDB's commit releases the GIL), and holds it back
    while the chunk is put: py-lmdb releases the GIL around every get and put, so two
    threads reading and putting at once hand it over once per vector (ungated, that was
    slower on the device: 118 k vs 141 k vectors/s unflushed). On by default: gated, it
    measured 202 k against 169 k vectors/s without it on the device (1 M vectors, 8 shards,
    5da4772). Raises
    StoreMismatchError (tables that differ, an id naming two sequences: nothing written),
    StoreError, UsageError.
    """
    progress = _Stoppable(progress or NoProgress(), stop)
    out = os.fspath(out)
    if transaction_bytes < 1:
        raise UsageError(f"the transaction size must be positive, got {transaction_bytes}")
    paths = input_paths(out, stores)
    began = time.perf_counter()
    discard_damaged(Path(out))  # before anything reads it
    with ExitStack() as stack:
        snaps = [stack.enter_context(Snapshot(p)) for p in paths]
        try:
            plan = make_plan(out, snaps, progress)
        except Interrupted:  # during the id check: nothing written
            return MergeSummary(out=out, stores=paths, run_id=merge_run_id(paths),
                                interrupted=True, seconds=time.perf_counter() - began)
        summary = MergeSummary(out=out, stores=paths, run_id=plan.run_id,
                               resumed=plan.mode == "resume", restarted=plan.mode == "restart",
                               already_complete=plan.mode == "complete")
        if plan.mode != "complete":
            _Merge(plan, snaps, summary, progress, transaction_bytes, stop,
                   WriteModes(sync, read_ahead, deferred)).run()
        summary.tables = {t: _flat(c) for t, c in plan.progress.items()}
        summary.seconds = time.perf_counter() - began
        if verify and not summary.interrupted:
            from gpuengine.store.verify import verify_merge

            try:
                summary.verify = verify_merge(out, snaps, plan.specs, summary.tables, progress)
            except Interrupted:
                summary.interrupted = True
            summary.verify_seconds = time.perf_counter() - began - summary.seconds
    return summary


@contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (restored after). A merge pass
    holds hundreds of thousands of tuples of memoryviews, which the collector would scan
    again and again (on the 2-core VM it tripled the time to read the inputs); they hold no
    reference cycles, so reference counting frees them all the same."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _flat(state: dict[str, Any]) -> dict[str, int]:
    return {f"{kind}_{name}": value for kind in KINDS for name, value in state[kind].items()
            if isinstance(value, int) and not isinstance(value, bool)}


# -- writing --------------------------------------------------------------------------------


def _dump(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, default=str).encode("utf-8")


@dataclass
class WriteModes:
    """How a merge writes OUT (see :func:`merge_stores`)."""

    sync: bool = True
    read_ahead: bool = True
    deferred: bool = True


class _Merge:
    """The writing half of a merge (steps 4 and 5 of the module docstring)."""

    def __init__(self, plan: Plan, snaps: list[Snapshot], summary: MergeSummary,
                 progress: MergeProgress, transaction_bytes: int,
                 stop: threading.Event | None, modes: WriteModes) -> None:
        self.plan, self.snaps, self.summary = plan, snaps, summary
        self.progress, self.chunk_bytes, self.stop = progress, transaction_bytes, stop
        self.sync, self.read_ahead = modes.sync, modes.read_ahead
        self.deferred = modes.deferred
        self.flusher: Flusher | None = None
        self.gate: threading.Event | None = None
        self.key = plan.run_id.encode("ascii")

    def run(self) -> None:
        plan = self.plan
        with StoreWriter(plan.out, initial_map_size=plan.estimate, sync=self.sync) as writer:
            for table in plan.tables:  # creates them, or checks them once more
                writer.open_table(plan.specs[table])
        deferred = self.deferred and self.sync and plan.deferrable and boot_id() is not None
        if deferred:
            write_marker(Path(plan.out), "unsynced")  # before the first unflushed commit
        completed = self._bulk(deferred)
        if deferred:  # flushed by _bulk: OUT is whole on any boot
            write_marker(Path(plan.out), "synced")
        if completed:
            self.env = open_store(plan.out, writer=True, sync=self.sync)
            try:
                self.runs_db = self.env.db(RUNS_DB)
                self.env.write(self._finish)  # flushed at commit (unless sync=False)
            finally:
                self.env.close()
            if deferred:
                remove_marker(Path(plan.out))

    def _bulk(self, deferred: bool) -> bool:
        """The merge record and both passes of every table (deferred: commits unflushed, a
        second thread flushing each one while the next is made; then one flush of everything
        before returning, whatever happened). True when every pass is done."""
        plan = self.plan
        self.env = open_store(plan.out, writer=True, sync=self.sync and not deferred)
        self.flusher = Flusher(self.env) if deferred else None
        try:
            self.env.ensure_map_size(plan.estimate)
            self.runs_db = self.env.db(RUNS_DB)
            self.env.write(self._begin)
            try:
                self._merge_tables()
                return True
            except Interrupted:
                self.summary.interrupted = True
                self.env.write(lambda txn: self._set_status(txn, "interrupted"))
                return False
            except BaseException as exc:
                status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                reason = str(exc)
                try:
                    self.env.write(lambda txn: self._set_status(txn, status, reason))
                except Exception:  # the original error says more
                    pass
                raise
        finally:
            try:
                if self.flusher is not None:
                    self.flusher.close()
                    self.env.sync()
            finally:
                self.env.close()

    def _merge_tables(self) -> None:
        started = time.perf_counter()
        try:
            with gc_paused():
                for table in self.plan.tables:
                    for kind in KINDS:
                        if not self.plan.progress[table][kind]["done"]:
                            total = sum(s.counts[table][kind] for s in self.snaps
                                        if table in s.counts)
                            what = "vectors" if kind == "emb" else "ids"
                            self.progress.start(f"table {table}: merging {what}", total)
                            self._pass(table, kind)
        finally:
            self.summary.merge_seconds += time.perf_counter() - started

    def _begin(self, txn: lmdb.Transaction) -> None:
        now = utc_now()
        raw = txn.get(self.key, db=self.runs_db)
        record = json.loads(bytes(raw)) if raw is not None else None
        if record is None or self.plan.mode in ("fresh", "restart"):
            record = {"run_id": self.plan.run_id, "started_at": now, "resumes": 0,
                      "committed_sequences": 0, "committed_records": 0,
                      **({"restarts": int(record.get("restarts", 0)) + 1} if record else {})}
        else:
            record["resumes"] = int(record.get("resumes", 0)) + 1
            record["resumed_at"] = now
        record.update(status="running", updated_at=now, info=self.plan.info,
                      progress=self.plan.progress)
        txn.put(self.key, _dump(record), db=self.runs_db)

    def _record(self, txn: lmdb.Transaction) -> dict[str, Any]:
        return json.loads(bytes(txn.get(self.key, db=self.runs_db)))

    def _set_status(self, txn: lmdb.Transaction, status: str, error: str = "") -> None:
        record = self._record(txn)
        record.update(status=status, updated_at=utc_now())
        if error:
            record["error"] = error
        txn.put(self.key, _dump(record), db=self.runs_db)

    def _pass(self, table: str, kind: str) -> None:
        """Merge one database of one table, one transaction per chunk (read a chunk ahead
        on another thread)."""
        state = self.plan.progress[table][kind]
        if state["done"]:
            return
        holders = [s for s in self.snaps if table in s.specs]
        db = self.env.db(emb_db_name(table) if kind == "emb" else ids_db_name(table))
        entry = max(s.entry_bytes(table, kind) for s in holders)
        block = block_items(self.chunk_bytes, len(holders), entry)
        views = kind == "emb"  # vectors are copied by the put, not into bytes first
        cursors = [(s.cursor(table, kind), block, *([s.cursor(table, kind, views=True)]
                                                    if views else []))
                   for s in holders]
        after = None if state["after"] is None else bytes.fromhex(state["after"])
        gate = self.gate = threading.Event() if self.read_ahead else None
        if gate is not None:
            gate.set()
        chunks = Prefetch(merged_chunks(cursors, after, max(1, int(self.chunk_bytes / entry)),
                                        pause=gate.wait if gate is not None else None),
                          threaded=self.read_ahead)
        try:
            for chunk in chunks:
                if gate is not None:
                    gate.clear()  # reopened by _commit once the puts are done
                if self.stop is not None and self.stop.is_set():
                    raise Interrupted
                self._write_chunk(table, kind, db, chunk, entry)
        except _Conflict as conflict:
            if gate is not None:
                gate.set()
            chunks.close()  # the inputs' transactions are this thread's again
            raise id_conflict(table, conflict.key, [
                *((s.label, s.get(table, "ids", conflict.key)) for s in holders),
                (f"{self.plan.out} (the output)", conflict.kept)],
                "The merge stopped before this transaction; what it committed is "
                "consistent.") from None
        finally:
            if gate is not None:
                gate.set()  # a reader waiting at the gate must see the stop
            chunks.close()
            for cursor, _, *view in cursors:
                cursor.close()
                for other in view:
                    other.close()
        self.plan.progress = self.env.write(lambda txn: self._mark_done(txn, table, kind))

    def _write_chunk(self, table: str, kind: str, db: Any, chunk: list[tuple[bytes, bytes]],
                     entry: float) -> None:
        nbytes = sum(map(len, map(_second, chunk))) if kind == "emb" else 0
        self.plan.progress = self.env.write(
            lambda txn: self._commit(txn, table, kind, db, chunk),
            size_hint=int(len(chunk) * entry) + (1 << 20))
        self.summary.transactions += 1
        if self.flusher is not None:
            self.flusher.committed()
        if kind == "emb":
            self.summary.vectors_read += len(chunk)
            self.summary.bytes_read += nbytes
        else:
            self.summary.ids_read += len(chunk)
        self.progress.advance(len(chunk), nbytes)

    def _commit(self, txn: lmdb.Transaction, table: str, kind: str, db: Any,
                chunk: list[tuple[bytes, bytes]]) -> dict[str, Any]:
        """Write one chunk and move the resume point, in one transaction (may run twice
        after a map growth: depends only on its arguments and the transaction)."""
        with txn.cursor(db=db) as cursor:
            added, split = _put_sorted(cursor, chunk)
        if self.gate is not None:  # the commit releases the GIL: read the next chunk now
            self.gate.set()
        counts = {"added": added, "duplicates": len(chunk) - added}
        if added < len(chunk):
            if kind == "emb":
                counts.update(_emb_duplicates(txn, db, chunk))
            else:
                _check_id_duplicates(txn, db, chunk)
        record = self._record(txn)
        state = record["progress"][table][kind]
        for name, value in counts.items():
            state[name] += value
        state["after"] = chunk[-1][0].hex()
        progress = record["progress"]
        record["committed_sequences"] = sum(  # each sequence has one array per output
            progress[t]["emb"]["added"] // len(self.plan.specs[t].outputs) for t in progress)
        record["committed_records"] = sum(progress[t]["ids"]["added"] for t in progress)
        record["updated_at"] = utc_now()
        txn.put(self.key, _dump(record), db=self.runs_db)
        return record["progress"]

    def _mark_done(self, txn: lmdb.Transaction, table: str, kind: str) -> dict[str, Any]:
        record = self._record(txn)
        record["progress"][table][kind]["done"] = True
        txn.put(self.key, _dump(record), db=self.runs_db)
        return record["progress"]

    def _finish(self, txn: lmdb.Transaction) -> None:
        """Carry every input's run records over and mark the merge complete."""
        carried = 0
        for snap in self.snaps:
            tag = snap.tag
            for run_id, raw in snap.runs.items():
                try:
                    record = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(record, dict):
                    continue
                record["merged_from"] = {"store": snap.path, "run_id": run_id}
                key = carried_run_key(run_id, tag).encode("ascii", "replace")
                txn.put(key, _dump(record), db=self.runs_db)
                carried += 1
        record = self._record(txn)
        now = utc_now()
        record.update(status="complete", updated_at=now, finished_at=now,
                      summary={"tables": {t: _flat(c) for t, c in record["progress"].items()},
                               "runs_carried": carried})
        txn.put(self.key, _dump(record), db=self.runs_db)
        self.summary.runs_carried = carried


def _put_sorted(cursor: lmdb.Cursor, chunk: list[tuple[bytes, bytes]]) -> tuple[int, int]:
    """Put a sorted chunk, never overwriting: appended where every key is above the
    database's last key, plain puts below it. Returns (added, split) where ``chunk[:split]``
    went through plain puts."""
    tail = bytes(cursor.key()) if cursor.last() else None
    if tail is None or chunk[0][0] > tail:
        return cursor.putmulti(chunk, append=True)[1], 0
    split = bisect.bisect_right(chunk, tail, key=first)
    added = cursor.putmulti(chunk[:split], overwrite=False)[1]
    if split < len(chunk):
        added += cursor.putmulti(chunk[split:], append=True)[1]
    return added, split


def _emb_duplicates(txn: lmdb.Transaction, db: Any,
                    chunk: list[tuple[bytes, bytes]]) -> dict[str, int]:
    """Of the copies not written: how many had other bytes than the kept one, and how many
    of those lost to OUT's own copy (the first copy in the chunk was not written either)."""
    differing = differing_existing = 0
    kept_key = kept = None
    existing = False
    for key, value in chunk:
        if key != kept_key:
            kept_key, kept = key, txn.get(key, db=db)
            existing = kept != value  # the first copy lost: OUT held the key already
            if existing:
                differing += 1
                differing_existing += 1
            continue
        if value != kept:
            differing += 1
            differing_existing += existing
    return {"differing": differing, "differing_existing": differing_existing}


class _Conflict(Exception):
    """An id the output maps to another sequence (found inside a write transaction; the
    message is made once the reading thread is stopped)."""

    def __init__(self, key: bytes, kept: bytes) -> None:
        super().__init__(key.hex())
        self.key, self.kept = key, kept


def _check_id_duplicates(txn: lmdb.Transaction, db: Any,
                         chunk: list[tuple[bytes, bytes]]) -> None:
    """Every id not written must name the sequence OUT now holds for it (else abort)."""
    kept_key = kept = None
    for key, value in chunk:
        if key != kept_key:
            kept_key, kept = key, txn.get(key, db=db)
        if kept[:16] != value[:16]:
            raise _Conflict(key, bytes(kept))
