"""The store's single writer in a child process of its own (own interpreter, own GIL).

py-lmdb releases the interpreter lock on every put; in the engine's process, where the engine
loop, the planner, the device workers and the input feeder all run Python, each put must win
the lock back (a put of a few µs took hundreds of µs). :class:`CommitterProcess` has the
interface of :class:`~gpuengine.committer.Committer` (``start``, ``put``, ``wait_idle``,
``finish``, ``snapshot``, ``error``, ``counts``), but the transactions run in a child
(``python -m gpuengine.writer_process``; lmdb and numpy, no torch):

* a **sender** thread (``gpuengine-committer``) takes the engine's groups from its queue and
  writes each down the child's stdin as a ``GRUP`` frame (:mod:`gpuengine.store.group_frames`:
  digests, ids, keys and vectors as raw bytes, no pickle);
* the child reads frames on one thread (the pipe's reads release its lock), which also decodes
  and encodes each group for its transaction (while the other thread's commit writes pages and
  waits for the disk without the lock), and commits them on another with group commit as
  :class:`~gpuengine.committer.Committer` does (the groups waiting merged into one transaction,
  up to ``max_bytes`` of vectors, more in a large table: :func:`~gpuengine.committer.
  transaction_bytes`); after each durable commit it
  answers ``ACKD`` (groups, sequences, records, seconds), or ``FAIL`` (the error's class and
  message) and drops what follows;
* an **acknowledgement** thread (``gpuengine-committer-acks``) reads the answers, advances the
  counters and releases the digests from the ledger: a sequence is done only once the child has
  committed it durably.

Frames are a 4-byte tag and a little-endian uint64 length, as the input processes'. Parent →
child: ``CONF`` (JSON: store path, table spec, run id, max_bytes, map size), ``GRUP`` frames, ``FINI``
(commit what is queued, answer ``DONE``, exit). Child → parent: ``ACKD``, ``FAIL``, ``DONE``.

The child ignores SIGINT and SIGTERM (the engine drains and then finishes it), runs in its own
session and dies with the engine: ``PR_SET_PDEATHSIG`` (SIGKILL), and an end of its input
without ``FINI`` makes it exit at once without committing more (a transaction in progress is
aborted: LMDB never shows half of one). If the child dies, the run stops with a StoreError
naming how (exit status 1; what was committed is intact, a rerun resumes).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from itertools import chain
from typing import BinaryIO, Sequence

from gpuengine.committer import MAX_TRANSACTION_BYTES, CommitCounts, transaction_bytes
from gpuengine.errors import GpuEngineError, InternalError, StoreError
from gpuengine.pipe_frames import (GPUENGINE_ERRORS, child_main, close_pipes, error_from,
                                   error_payload, frame, how_it_ended, read_frame, start_child,
                                   write_all)
from gpuengine.store.commit_group import (CommitPart, embedded_digest_lists, encode_for_commit,
                                          merge_encoded)
from gpuengine.store.group_frames import decode_group, encode_group, split_payload
from gpuengine.store.schema import TableSpec

_ACK = struct.Struct("<IQQd")  # groups, sequences, records, seconds
_PR_SET_PDEATHSIG = 1
_CHILD_GROUPS = 48
"""Groups the child holds read but not committed (then the pipe, then the sender's queue of 16),
and so the most one transaction can merge when the writer falls behind: each transaction
copies every leaf page its random keys touch, which in a large table is nearly one a key, so
merging more a transaction writes fewer bytes a vector (16 held: 5 193-5 353 B a read at 6 M
reads, 48: 4 732-4 770; docs/benchmarks.md, "The store's table growing")."""
_CHILD_BYTES_FACTOR = 3
"""The child stops reading while the vectors it holds exceed this many transactions' worth
(:func:`~gpuengine.committer.transaction_bytes`; 768 MiB in a table of up to 2^20 entries), so
wide per-token groups cannot pile up 48 deep (48 part groups of a 2-writer DNABERT-S run,
8 192 reads a group, hold 604 MB: within it)."""
_RAISABLE = {**GPUENGINE_ERRORS, "ValueError": ValueError, "TypeError": TypeError}


# ----------------------------------------------------------------------------- parent side


class CommitterProcess:
    """The writer of one run's table in a child process; see the module docstring. Use as
    :class:`~gpuengine.committer.Committer`: :meth:`start`, :meth:`put` groups, then always
    :meth:`finish` (it reaps the child on every path)."""

    command = [sys.executable, "-m", "gpuengine.writer_process"]

    def __init__(self, path: str | os.PathLike[str], spec: TableSpec, run_id: str, ledger, *,
                 max_bytes: int = MAX_TRANSACTION_BYTES, map_size: int = 1 << 30):
        self.path = os.fspath(path)
        self.map_size = map_size
        """The map the child opens the store with (it grows it as the writer thread would)."""
        self.spec, self.run_id, self.ledger, self.max_bytes = spec, run_id, ledger, max_bytes
        import queue

        self.inbox: queue.Queue[tuple[list[CommitPart], dict | None] | None] = queue.Queue(16)
        self.counts = CommitCounts()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._put = 0
        """Groups handed in (engine thread)."""
        self._done = 0
        """Groups committed or dropped."""
        self._sent: deque[list[Sequence[bytes]]] = deque()
        """Per group sent and not yet acknowledged, its embedded digests (its digest columns:
        :func:`~gpuengine.store.commit_group.embedded_digest_lists`)."""
        self._closing = False
        self._finished = False
        self.proc: subprocess.Popen | None = None
        self._sender: threading.Thread | None = None
        self._acks: threading.Thread | None = None

    # -- the Committer interface -----------------------------------------------------------

    def start(self) -> None:
        self.proc = start_child(self.command, {"GPUENGINE_WRITER_PARENT": str(os.getpid())})
        conf = json.dumps({"path": self.path, "spec": self.spec.to_json(), "run_id": self.run_id,
                           "max_bytes": self.max_bytes, "map_size": self.map_size}).encode("utf-8")
        try:
            write_all(self.proc.stdin.fileno(), frame(b"CONF", [conf]))
        except OSError:
            pass  # the child died at once: the acknowledgement thread says how
        self._sender = threading.Thread(target=self._send, name="gpuengine-committer",
                                        daemon=True)
        self._acks = threading.Thread(target=self._read_acks, name="gpuengine-committer-acks",
                                      daemon=True)
        self._sender.start()
        self._acks.start()

    def is_alive(self) -> bool:
        return self.proc is not None and not self._finished

    def put(self, group: list[CommitPart], extra_runs: dict[str, dict] | None = None) -> None:
        """Queue a group (and run records to write in the same transaction)."""
        if group or extra_runs:
            with self._lock:
                self._put += 1
            self.inbox.put((group, extra_runs))

    def wait_idle(self) -> None:
        """Block until every group queued so far is committed (or, after a failure, dropped)."""
        with self._settled:
            while self._done < self._put and self.error is None:
                self._settled.wait()

    def finish(self) -> None:
        """Commit everything queued, then stop the child and both threads (blocks until
        done); idempotent."""
        if self._finished or self.proc is None:
            self._finished = True
            return
        self.inbox.put(None)
        self._sender.join()
        self._acks.join()
        self._reap()

    def snapshot(self) -> CommitCounts:
        with self._lock:
            return CommitCounts(**vars(self.counts))

    # -- threads ---------------------------------------------------------------------------

    def _send(self) -> None:
        fd = self.proc.stdin.fileno()
        broken = False
        try:
            while True:
                item = self.inbox.get()
                if item is None:
                    if not broken:
                        try:
                            write_all(fd, frame(b"FINI", []))
                        except OSError:
                            pass
                    return
                if broken or self.error is not None:  # after a failure, drop
                    self._settle(1)
                    continue
                group, extra_runs = item
                try:
                    buffers = encode_group(group, extra_runs)
                except BaseException as exc:  # noqa: BLE001 - a bad group fails the run
                    self._fail(exc)
                    self._settle(1)
                    continue
                with self._lock:
                    self._sent.append(embedded_digest_lists(group))
                try:
                    write_all(fd, frame(b"GRUP", buffers))
                except OSError:  # the child is gone: the acknowledgement thread says how
                    broken = True
        finally:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def _read_acks(self) -> None:
        out, done = self.proc.stdout, False
        try:
            while (got := read_frame(out)) is not None:
                tag, payload = got
                if tag == b"ACKD":
                    self._acknowledged(*_ACK.unpack(payload))
                elif tag == b"FAIL":
                    self._fail(error_from(payload, _RAISABLE, "store writer process"))
                elif tag == b"DONE":
                    done = True
                    break
                else:
                    self._fail(InternalError(f"the store writer process sent an unknown frame "
                                             f"{bytes(tag)!r}"))
        except (OSError, EOFError, ValueError):
            pass
        if not done:
            self._fail(self._died())

    def _acknowledged(self, groups: int, sequences: int, records: int, seconds: float) -> None:
        columns: list[Sequence[bytes]] = []
        with self._lock:
            for _ in range(groups):
                columns.extend(self._sent.popleft())
            self.counts.transactions += 1
            self.counts.groups += groups
            self.counts.sequences += sequences
            self.counts.records += records
            self.counts.busy_seconds += seconds
        self.ledger.committed(chain.from_iterable(columns))
        self._settle(groups)

    def _settle(self, groups: int) -> None:
        with self._settled:
            self._done += groups
            self._settled.notify_all()

    def _fail(self, exc: BaseException) -> None:
        with self._settled:
            if self.error is None:
                self.error = exc
            self._settled.notify_all()

    def _died(self) -> GpuEngineError:
        how = how_it_ended(self.proc, "stopped answering")
        return StoreError(f"the store writer process (pid {self.proc.pid}) {how} before the "
                          "run's last commit; what was committed is intact, rerun to resume")

    def _reap(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        close_pipes(self.proc)
        self._finished = True


# ----------------------------------------------------------------------------- child side


class _Prepared:
    """A ``GRUP`` frame decoded and encoded for its transaction by the reading thread (while
    the committing thread's previous commit writes pages and waits for the disk, with the
    interpreter lock released), or the error that encoding raised."""

    __slots__ = ("group", "extra", "nbytes", "error")

    def __init__(self, payload: bytearray, spec: TableSpec) -> None:
        self.group, self.extra, self.nbytes, self.error = None, None, 0, None
        try:
            header, blobs = split_payload(payload)
            self.extra, self.nbytes = header["extra"], header["nbytes"]
            self.group = encode_for_commit(spec, decode_group(header, blobs, spec.outputs))
        except Exception as exc:  # noqa: BLE001 - reported in order by the committing thread
            self.error = exc


class _ChildWriter:
    """The child's committing thread: group commit of the groups the reading thread queues,
    already encoded (:class:`_Prepared`), so this thread only puts and commits."""

    def __init__(self, writer, spec: TableSpec, run_id: str, max_bytes: int, out: BinaryIO):
        import queue

        self.writer, self.spec, self.run_id, self.max_bytes = writer, spec, run_id, max_bytes
        self.out = out
        self.inbox: queue.Queue[_Prepared | None] = queue.Queue(_CHILD_GROUPS)
        self.error: BaseException | None = None
        self._held = 0  # vector bytes of the groups in the inbox and in the merge being made
        self._room = threading.Condition()
        self._draining = False
        self._entries = writer.lookup(spec.name)
        self._limit = transaction_bytes(max_bytes, self._entries.embedding_count())

    def enqueue(self, item: _Prepared | None) -> None:
        """Hand the committing thread a group (None: the end), first waiting while the groups
        held already hold ``_CHILD_BYTES_FACTOR`` transactions' worth of vectors (one group
        alone always passes)."""
        if item is not None:
            with self._room:
                self._room.wait_for(lambda: self._draining or self._held == 0
                                    or self._held < _CHILD_BYTES_FACTOR * self._limit)
                self._held += item.nbytes
        self.inbox.put(item)

    def _release(self, merged: list[_Prepared]) -> None:
        with self._room:
            self._held -= sum(p.nbytes for p in merged)
            self._room.notify_all()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - a bug here: reported, then drain
            self._failed(exc)
            with self._room:  # what a merge held is not released now: stop counting
                self._draining = True
                self._room.notify_all()
            while self.inbox.get() is not None:
                pass

    def _failed(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
            write_all(self.out.fileno(), frame(b"FAIL", [error_payload(exc, _RAISABLE)]))

    def _run(self) -> None:
        import queue

        done = False
        while not done:
            item = self.inbox.get()
            if item is None:
                return
            merged = [item]
            nbytes = item.nbytes
            while nbytes < self._limit and item.error is None:  # group commit
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    done = True
                    break
                merged.append(item)
                nbytes += item.nbytes
            if self.error is None:  # after a failure, drain without writing
                self._commit(merged)
                self._limit = transaction_bytes(self.max_bytes, self._entries.embedding_count())
            self._release(merged)

    def _commit(self, merged: list[_Prepared]) -> None:
        """Commit the encoded groups before the first that failed to encode (if any), then
        report that failure: the groups before it are as valid as they were alone."""
        failed = next((p.error for p in merged if p.error is not None), None)
        good = merged if failed is None else merged[:-1]  # a failed one ends a merge
        if good:
            started = time.perf_counter()
            try:
                extra_runs: dict = {}
                for prepared in good:
                    extra_runs.update(prepared.extra or {})  # later records supersede earlier
                sequences, records = self.writer.commit_encoded(
                    self.spec.name, merge_encoded([p.group for p in good]), run_id=self.run_id,
                    extra_runs=extra_runs or None)
            except BaseException as exc:  # noqa: BLE001 - reported to the engine, which raises it
                self._failed(exc)
                return
            ack = _ACK.pack(len(good), sequences, records, time.perf_counter() - started)
            write_all(self.out.fileno(), frame(b"ACKD", [ack]))
        if failed is not None:
            self._failed(failed)


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """The child's loop: the configuration, then groups until ``FINI`` (answered ``DONE``);
    the end of the input without ``FINI`` (the engine is gone) exits at once."""
    from gpuengine.store.writer import StoreWriter

    got = read_frame(inp)
    if got is None or got[0] != b"CONF":
        raise InternalError("store writer process: no configuration received")
    conf = json.loads(bytes(got[1]).decode("utf-8"))
    spec = TableSpec.from_json(conf["spec"])
    with StoreWriter(conf["path"], initial_map_size=conf["map_size"]) as writer:
        writer.open_table(spec)
        child = _ChildWriter(writer, spec, conf["run_id"], conf["max_bytes"], out)
        thread = threading.Thread(target=child.run, name="gpuengine-writer", daemon=True)
        thread.start()
        while True:
            got = read_frame(inp)
            if got is None:  # no FINI: the engine died; commit nothing more
                os._exit(1)
            tag, payload = got
            if tag == b"GRUP":
                child.enqueue(_Prepared(payload, spec))
            elif tag == b"FINI":
                child.enqueue(None)
                break
            else:
                raise InternalError(f"store writer process: unexpected frame {bytes(tag)!r}")
        thread.join()
    write_all(out.fileno(), frame(b"DONE", []))


def _die_with_parent() -> None:
    """SIGKILL when the engine dies (Linux), and exit now if it is already gone."""
    parent = os.environ.get("GPUENGINE_WRITER_PARENT", "")
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the end of the input still stops it
    if parent.isdigit() and os.getppid() != int(parent):
        os._exit(1)


def main() -> int:
    """The store writer process (``python -m gpuengine.writer_process``)."""
    return child_main(serve, out_buffering=0, raisable=_RAISABLE, setup=_die_with_parent)


if __name__ == "__main__":
    sys.exit(main())
