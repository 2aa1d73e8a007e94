"""One LMDB environment per store and process, shared by the writer and every reader.

py-lmdb allows a single :class:`lmdb.Environment` per path and process, so this module keeps
a process-wide registry (real path -> environment + reference count). :func:`open_store`
hands out :class:`StoreEnv` handles; the last ``close()`` closes the environment.

Transactions run through :meth:`StoreEnv.read` and :meth:`StoreEnv.write`, which take a
function of the transaction and retry it when LMDB asks for it:

* ``MapResizedError`` (another process grew the map): adopt the new size, retry;
* ``MapFullError`` in a write: the transaction is dead; abort, grow the map (x2, at least
  by the transaction's size hint), retry the whole transaction.

Changing the map size while any transaction of this process is open is unsafe, so every
transaction holds a shared lock of the environment and resizing holds it exclusively.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import lmdb

from gpuengine.errors import InternalError, StoreError

T = TypeVar("T")

MAX_DBS = 64
"""Every opener passes the same ``max_dbs``."""
MAP_ROUND = 1 << 16
"""Map sizes are rounded up to a multiple of this (64 KiB: a multiple of any page size)."""
_MAX_RESIZE_RETRIES = 64


class _SharedExclusiveLock:
    """Many shared holders or one exclusive holder; waiting exclusive holders go first.

    Shared acquisition is re-entrant per thread (a thread already holding it never waits),
    so a nested transaction helper cannot deadlock behind a waiting resize.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0
        self._local = threading.local()

    @contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            with self._cond:
                while self._exclusive or self._waiting:
                    self._cond.wait()
                self._shared += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                with self._cond:
                    self._shared -= 1
                    if self._shared == 0:
                        self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        if getattr(self._local, "depth", 0):
            raise InternalError("map resize requested inside a transaction of the same thread")
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class _Entry:
    """Registry state of one open environment (mutable, guarded by the registry lock)."""

    def __init__(self, path: str, env: lmdb.Environment, writable: bool) -> None:
        self.path = path
        self.env = env
        self.writable = writable
        self.pid = os.getpid()
        self.refs = 0
        self.has_writer = False
        self.lock = _SharedExclusiveLock()
        self.dbi_lock = threading.Lock()
        self.dbis: dict[str, Any] = {}


_REGISTRY: dict[str, _Entry] = {}
_REGISTRY_LOCK = threading.Lock()


def _create_env(path: str, map_size: int, sync: bool) -> lmdb.Environment:
    os.makedirs(path, exist_ok=True)
    return lmdb.open(path, map_size=map_size, subdir=True, max_dbs=MAX_DBS, sync=sync,
                     create=True, lib_version=0)


def _open_env(path: str, *, writer: bool, create: bool, map_size: int,
              sync: bool) -> tuple[lmdb.Environment, bool]:
    """Open (or create) the environment at ``path``; return it and whether it is writable."""
    if not os.path.exists(path):
        if not create:
            raise StoreError(f"no store at {path} (the path does not exist)")
        return _create_env(path, map_size, sync), True
    if not os.path.isdir(path):
        raise StoreError(
            f"{path} is not a gpuengine store: a store is a directory holding data.mdb and lock.mdb"
        )
    data = os.path.join(path, "data.mdb")
    if not os.path.exists(data):
        if create and not os.listdir(path):
            return _create_env(path, map_size, sync), True
        raise StoreError(f"{path} is not a gpuengine store (it holds no data.mdb)")
    writable = writer or (os.access(path, os.W_OK) and os.access(data, os.W_OK))
    env = lmdb.open(path, map_size=0, subdir=True, max_dbs=MAX_DBS, sync=sync, create=False,
                    readonly=not writable)
    return env, writable


def open_store(path: str | os.PathLike[str], *, writer: bool, create: bool = False,
               map_size: int = 1 << 30, sync: bool = True,
               max_map_size: int = 1 << 44) -> StoreEnv:
    """A handle on the process-wide environment of ``path``, opening it if needed.

    ``create`` allows creating a missing store (or one in an empty directory) with the LMDB
    0.9 format; ``map_size`` and ``sync`` apply only when this call opens the environment.
    At most one writer per store and process. Raises StoreError.
    """
    real = os.path.realpath(os.fspath(path))
    with _REGISTRY_LOCK:
        entry = _REGISTRY.get(real)
        if entry is not None and entry.pid != os.getpid():
            del _REGISTRY[real]  # inherited through fork: never touch the parent's handle
            entry = None
        if entry is None:
            try:
                env, writable = _open_env(real, writer=writer, create=create,
                                          map_size=map_size, sync=sync)
                env.reader_check()
            except lmdb.Error as exc:
                raise StoreError(f"cannot open store {real}: {exc}") from exc
            except OSError as exc:  # e.g. a parent that is a file, no permission
                raise StoreError(f"cannot open store {real}: {exc.strerror or exc}") from exc
            entry = _Entry(real, env, writable)
            _REGISTRY[real] = entry
        elif writer and (entry.has_writer or not entry.writable):
            why = "a writer" if entry.has_writer else "read-only access"
            raise StoreError(f"store {real} is already open in this process with {why}")
        entry.refs += 1
        entry.has_writer = entry.has_writer or writer
        return StoreEnv(entry, writer=writer, max_map_size=max_map_size)


def _release(entry: _Entry, writer: bool) -> None:
    with _REGISTRY_LOCK:
        entry.refs -= 1
        if writer:
            entry.has_writer = False
        if entry.refs > 0:
            return
        if _REGISTRY.get(entry.path) is entry:
            del _REGISTRY[entry.path]
    if entry.pid == os.getpid():
        entry.env.close()


def _round_up(size: int) -> int:
    return -(-size // MAP_ROUND) * MAP_ROUND


class StoreEnv:
    """One opener's handle on a shared environment. Not for use after :meth:`close`."""

    def __init__(self, entry: _Entry, *, writer: bool, max_map_size: int) -> None:
        self._entry = entry
        self._writer = writer
        self._max_map_size = max_map_size
        self._closed = False
        self.growths = 0
        """How many times :meth:`write` grew the map after ``MapFullError``."""

    @property
    def path(self) -> str:
        return self._entry.path

    @property
    def env(self) -> lmdb.Environment:
        if self._closed:
            raise StoreError(f"store {self.path} is closed")
        return self._entry.env

    @property
    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def read(self, work: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``work`` in a short read transaction (``buffers=True``: copy values out)."""
        env = self.env
        for _ in range(_MAX_RESIZE_RETRIES):
            try:
                with self._entry.lock.shared(), env.begin(buffers=True) as txn:
                    return work(txn)
            except lmdb.MapResizedError:
                self._adopt_map_size()
            except lmdb.Error as exc:
                raise StoreError(f"LMDB error reading store {self.path}: {exc}") from exc
        raise StoreError(f"store {self.path}: the map kept being resized; giving up")

    @contextmanager
    def snapshot(self, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        """One long read transaction (values are bytes, or with ``buffers`` memoryviews of
        the map, valid until the block ends): a consistent view of the whole store for as
        long as the block runs, for a merge or a verify reading a closed store. Not for
        reading a store that a writer is filling (the file would grow while it is held); the
        map cannot be resized in this process meanwhile."""
        env = self.env
        for _ in range(_MAX_RESIZE_RETRIES):
            with self._entry.lock.shared():
                try:
                    txn = env.begin(buffers=buffers)
                except lmdb.MapResizedError:
                    txn = None
                except lmdb.Error as exc:
                    raise StoreError(f"LMDB error reading store {self.path}: {exc}") from exc
                if txn is not None:
                    try:
                        yield txn
                    finally:
                        txn.abort()
                    return
            self._adopt_map_size()
        raise StoreError(f"store {self.path}: the map kept being resized; giving up")

    def write(self, work: Callable[[lmdb.Transaction], T], *, size_hint: int = 0) -> T:
        """Run ``work`` in one write transaction, committed on return, aborted on error.

        ``work`` may run several times (after a map growth); it must depend only on its
        arguments and the transaction. ``size_hint`` is about how many bytes it writes.
        """
        if not self._writer:
            raise InternalError("write transaction requested through a read-only store handle")
        return self._write(work, size_hint)

    def _write(self, work: Callable[[lmdb.Transaction], T], size_hint: int) -> T:
        env = self.env
        for _ in range(_MAX_RESIZE_RETRIES):
            try:
                with self._entry.lock.shared(), env.begin(write=True, buffers=True) as txn:
                    return work(txn)
            except lmdb.MapResizedError:
                self._adopt_map_size()
            except lmdb.MapFullError:
                self._grow(size_hint)
            except lmdb.Error as exc:
                raise StoreError(f"LMDB error writing store {self.path}: {exc}") from exc
        raise StoreError(f"store {self.path}: could not commit after repeated map resizes")

    def sync(self) -> None:
        """Flush every committed page to the disk (fdatasync): for an environment opened
        with ``sync=False``. Safe while another thread writes: the map cannot be resized
        meanwhile."""
        env = self.env
        with self._entry.lock.shared():
            try:
                env.sync(True)
            except lmdb.Error as exc:
                raise StoreError(f"cannot flush store {self.path} to disk: {exc}") from exc

    def _adopt_map_size(self) -> None:
        """Pick up a map grown by another process (never shrink below our own size)."""
        with self._entry.lock.exclusive():
            env = self._entry.env
            before = int(env.info()["map_size"])
            env.set_mapsize(0)
            if int(env.info()["map_size"]) < before:
                env.set_mapsize(before)

    def _grow(self, size_hint: int) -> None:
        with self._entry.lock.exclusive():
            env = self._entry.env
            current = int(env.info()["map_size"])
            if current >= self._max_map_size:
                raise StoreError(
                    f"store {self.path} is full: the map reached max_map_size "
                    f"({self._max_map_size} bytes)"
                )
            wanted = _round_up(max(2 * current, current + 2 * size_hint + MAP_ROUND))
            env.set_mapsize(min(wanted, self._max_map_size))
        self.growths += 1

    def ensure_map_size(self, size: int) -> None:
        """Make the map at least ``size`` bytes (capped at max_map_size); never shrinks it."""
        size = min(_round_up(size), self._max_map_size)
        with self._entry.lock.exclusive():
            env = self._entry.env
            if int(env.info()["map_size"]) < size:
                env.set_mapsize(size)

    def db_in(self, txn: lmdb.Transaction, name: str, *, create: bool = False) -> Any:
        """Open a named database inside the caller's write transaction (None if absent).

        The handle is valid only once ``txn`` commits (LMDB discards it on abort); pass it
        to :meth:`remember` after the commit to share it with other openers.
        """
        with self._entry.dbi_lock:
            try:
                return self.env.open_db(name.encode("ascii"), txn=txn, create=create)
            except lmdb.NotFoundError:
                return None

    def remember(self, name: str, handle: Any) -> None:
        """Share a committed database handle with every opener of this environment."""
        with self._entry.dbi_lock:
            self._entry.dbis.setdefault(name, handle)

    def db(self, name: str) -> Any:
        """A handle on an existing named database (cached per environment), or None.

        py-lmdb's C extension drops handles opened in a read transaction when it ends, so a
        writable environment opens them in a short, empty write transaction (which waits
        for a running commit); a read-only one lets py-lmdb open them in its own way.
        """
        with self._entry.dbi_lock:
            handle = self._entry.dbis.get(name)
            if handle is not None or not self._entry.writable:
                if handle is None:
                    handle = self._open_readonly_db(name)
                return handle
        handle = self._write(lambda txn: self.db_in(txn, name), 0)
        if handle is not None:
            self.remember(name, handle)
        return handle

    def _open_readonly_db(self, name: str) -> Any:
        """Open in a read-only environment (caller holds the dbi lock)."""
        for _ in range(_MAX_RESIZE_RETRIES):
            try:
                with self._entry.lock.shared():
                    handle = self.env.open_db(name.encode("ascii"), create=False)
            except lmdb.NotFoundError:
                return None
            except lmdb.MapResizedError:
                self._adopt_map_size()
                continue
            except lmdb.Error as exc:
                raise StoreError(
                    f"LMDB error opening {name!r} in store {self.path}: {exc}"
                ) from exc
            self._entry.dbis[name] = handle
            return handle
        raise StoreError(f"store {self.path}: the map kept being resized; giving up")

    def close(self) -> None:
        """Release this handle; the environment closes with the last one. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _release(self._entry, self._writer)
