"""Deferred flushing for a merge into a new store: commit without fsync, flush on a second
thread, sync once at the end, and never trust what an OS crash may have left half-written.

LMDB with ``sync=False`` survives the death of the process (the committed pages are in the
page cache, which the kernel keeps), but not an OS crash or power loss: the meta page may
reach the disk before the pages it points to, and the store is then corrupt. A merge into a
store that holds nothing else can take that risk if it can tell, after the fact, whether such
a crash happened: the *marker file* ``merge-unsynced.json`` in the store's directory says
the store may hold unflushed commits, and the Linux boot id of the system that made them
(``/proc/sys/kernel/random/boot_id``, new at every boot). Its states:

* ``unsynced`` with the current boot id: the same kernel still holds every page that was
  committed, so the store is whole (a process killed with ``kill -9`` leaves this): resume.
* ``unsynced`` with another boot id: an OS crash (or reboot) came between a commit and its
  flush. The store may be damaged: it is emptied and the merge starts over (it holds nothing
  but an unfinished merge's output, and the inputs are untouched).
* ``synced``: everything committed was flushed; whole on any boot.

The marker is written and flushed (file and directory) before the first unflushed commit;
the merge flushes the store (:meth:`StoreEnv.sync`) before it records itself complete, and
removes the marker only after that. A store that holds data of its own (it existed, was not
made by a deferred merge, and has entries) is never merged this way.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from gpuengine.errors import StoreError
from gpuengine.store.environment import StoreEnv

log = logging.getLogger(__name__)

MARKER = "merge-unsynced.json"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str | None:
    """The running kernel's boot id, or None where there is none (not Linux)."""
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_marker(store: Path) -> dict | None:
    """The marker of ``store`` (None if it has none; an unreadable one counts as unsynced
    from an unknown boot)."""
    path = Path(store) / MARKER
    if not path.exists():
        return None
    try:
        marker = json.loads(path.read_text())
        return marker if isinstance(marker, dict) else {"state": "unsynced"}
    except (OSError, ValueError):
        return {"state": "unsynced"}


def write_marker(store: Path, state: str) -> None:
    """Write the marker durably (a temporary file, fsync, rename, fsync of the directory).
    Raises StoreError."""
    store = Path(store)
    temp = store / (MARKER + ".tmp")
    try:
        with open(temp, "w") as f:
            json.dump({"state": state, "boot_id": boot_id(), "pid": os.getpid()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, store / MARKER)
        _fsync_dir(store)
    except OSError as exc:
        raise StoreError(f"cannot write {store / MARKER}: {exc.strerror or exc}") from exc


def remove_marker(store: Path) -> None:
    """The store is an ordinary one again (everything in it flushed). Raises StoreError."""
    path = Path(store) / MARKER
    try:
        if path.exists():
            path.unlink()
            _fsync_dir(Path(store))
    except OSError as exc:
        raise StoreError(f"cannot remove {path}: {exc.strerror or exc}") from exc


def may_be_damaged(marker: dict | None) -> bool:
    """Whether a store with this marker may have lost commits in an OS crash."""
    if marker is None or marker.get("state") == "synced":
        return False
    current = boot_id()
    return current is None or marker.get("boot_id") != current


def discard_damaged(store: Path) -> bool:
    """Empty ``store`` when its marker says an OS crash may have damaged it (the files of
    the LMDB environment and the marker go; the directory stays). True if it did."""
    store = Path(store)
    marker = read_marker(store)
    if not may_be_damaged(marker):
        return False
    log.warning("%s holds the output of a merge that was not flushed to disk before the "
                "system restarted (boot %s); it may be damaged, so the merge starts over",
                store, (marker or {}).get("boot_id"))
    try:
        for name in ("data.mdb", "lock.mdb", MARKER + ".tmp"):
            (store / name).unlink(missing_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot empty {store}: {exc.strerror or exc}") from exc
    remove_marker(store)
    return True


class Flusher:
    """Flushes a store on a thread of its own after each commit it is told of
    (:meth:`committed`), so that the disk writes the last transaction while the merge reads
    and puts the next one. :meth:`close` joins the thread and re-raises its error."""

    def __init__(self, env: StoreEnv) -> None:
        self._env = env
        self._wanted = threading.Event()
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gpuengine-merge-flush",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stop:
                return
            try:
                self._env.sync()
            except BaseException as exc:  # handed to the merge at close()
                self._error = exc
                return

    def committed(self) -> None:
        if self._error is not None:
            raise self._error
        self._wanted.set()

    def close(self) -> None:
        self._stop = True
        self._wanted.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
