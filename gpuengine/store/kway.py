"""K-way merge of sorted LMDB databases, in chunks sized for one write transaction.

Every source is a cursor on a database with LMDB's default byte-wise key order. Each round
reads a block from every source that has none buffered (``islice`` over ``iternext``: no
per-item Python code), takes as *bound* the smallest last key among the sources that are not
exhausted, and emits every buffered item whose key is at most the bound (no source can still
hold a smaller key). The emitted items are concatenated in source order and sorted by key
with a stable sort in C (timsort merges the presorted runs), so equal keys from several
sources end up adjacent, in source order: the first of them is the one a merge keeps.

All copies of one key are in the same chunk, so a chunk's last key is a resume point: a
merge that committed up to key K restarts every source after K.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import lmdb

from gpuengine.errors import InternalError

first = operator.itemgetter(0)

MIN_BLOCK = 16
MAX_BLOCK = 1 << 16


class _Source:
    """One cursor positioned after the resume point, with its buffered block. With a second
    cursor ``values`` (on the same database, in a transaction yielding memoryviews) the keys
    are read as bytes from ``cursor`` and the values as views from ``values``: a value is then
    copied once, by the put that writes it, instead of into a bytes object first."""

    def __init__(self, cursor: lmdb.Cursor, after: bytes | None, block: int,
                 values: lmdb.Cursor | None = None, keys_only: bool = False) -> None:
        self.block = block
        self.buffer: list[tuple[bytes, Any]] = []
        self.exhausted = not _position(cursor, after)
        self.values = None
        if self.exhausted:  # iternext() on an unpositioned cursor would start again
            self.items: Iterator = iter(())
        elif values is None:
            self.items = cursor.iternext(values=not keys_only)
        else:
            if not _position(values, after):
                raise InternalError("two cursors of one snapshot disagree")
            self.items = cursor.iternext(values=False)
            self.values = values.iternext(keys=False)

    def fill(self) -> None:
        if self.buffer or self.exhausted:
            return
        if self.values is None:
            self.buffer = list(islice(self.items, self.block))
        else:
            keys = list(islice(self.items, self.block))
            self.buffer = list(zip(keys, islice(self.values, len(keys))))
        self.exhausted = len(self.buffer) < self.block


def _position(cursor: lmdb.Cursor, after: bytes | None) -> bool:
    """Put ``cursor`` on the first key (after ``after``); False when there is none."""
    if after is None:
        return cursor.first()
    ok = cursor.set_range(after)
    if ok and cursor.key() == after:
        ok = cursor.next()
    return ok


def block_items(chunk_bytes: int, sources: int, entry_bytes: float) -> int:
    """Items per block read from one source so that a round is about one chunk."""
    wanted = int(chunk_bytes / max(1, sources) / max(1.0, entry_bytes))
    return max(MIN_BLOCK, min(MAX_BLOCK, wanted))


def merged_chunks(cursors: list[tuple], after: bytes | None, chunk_items: int,
                  keys_only: bool = False,
                  pause: Callable[[], object] | None = None) -> Iterator[list[Any]]:
    """Lists of ``(key, value)`` in key order (equal keys adjacent, in source order), each
    of at least ``chunk_items`` items but the last. ``cursors`` are ``(cursor, block
    items)`` pairs, or ``(cursor, block items, value cursor)`` triples (values as the value
    cursor yields them: see :class:`_Source`); reading starts after the key ``after``
    (None: at the first key). ``keys_only``: lists of keys instead (pairs only). ``pause``
    is called before each block is read (it may block: see ``merge``'s read-ahead)."""
    sources = [_Source(cursor, after, *rest, keys_only=keys_only) for cursor, *rest in cursors]
    key = None if keys_only else first
    last = operator.itemgetter(-1) if keys_only else _last_key
    pending: list[tuple[bytes, bytes]] = []
    while True:
        for source in sources:
            if pause is not None and not source.buffer and not source.exhausted:
                pause()
            source.fill()
        live = [s for s in sources if s.buffer]
        if not live:
            break
        bound = min((last(s.buffer) for s in live if not s.exhausted), default=None)
        run: list[Any] = []
        for source in live:
            buffer = source.buffer
            if bound is None or last(buffer) <= bound:
                run += buffer
                source.buffer = []
            else:
                cut = bisect.bisect_right(buffer, bound, key=key)
                run += buffer[:cut]
                source.buffer = buffer[cut:]
        if len(live) > 1:
            run.sort(key=key)
        pending += run
        if len(pending) >= chunk_items:
            yield pending
            pending = []
    if pending:
        yield pending


def _last_key(buffer: list[tuple[bytes, Any]]) -> bytes:
    return buffer[-1][0]


def has_equal_neighbours(keys: list[bytes]) -> bool:
    """Whether two adjacent keys of a sorted list are equal (a C-speed scan)."""
    return any(map(operator.eq, keys, islice(keys, 1, None)))


class Prefetch:
    """Iterates ``source`` on a thread of its own, up to ``depth`` items ahead of the
    consumer, so that reading the inputs (LMDB releases the GIL while it reads) overlaps
    writing the output. Iterate it once; :meth:`close` (also on an error of the consumer)
    stops the thread and joins it. An error of ``source`` is raised to the consumer.
    ``threaded=False`` iterates ``source`` on the consumer's thread instead."""

    _END = object()

    def __init__(self, source: Iterator, depth: int = 1, threaded: bool = True) -> None:
        import queue
        import threading

        self._source = source
        self._threaded = threaded
        if not threaded:
            return
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gpuengine-merge-read",
                                        daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
        except BaseException as exc:  # handed to the consumer
            self._error = exc
        self._put(self._END)

    def __iter__(self) -> Iterator:
        if not self._threaded:
            yield from self._source
            return
        while True:
            item = self._queue.get()
            if item is self._END:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def close(self) -> None:
        """Stop reading ahead and join the thread (idempotent)."""
        import queue

        if not self._threaded:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
