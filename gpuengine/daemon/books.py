"""State the daemon keeps on disk: attempts per file, and job records."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpuengine.daemon.files import atomic_write_json, utc_now

log = logging.getLogger("gpuengine.daemon")

# ----------------------------------------------------------------------------- state on disk


class AttemptBook:
    """``attempts.json``: started attempts and recent errors of each file in ``processing/``.

    An attempt is counted before the run starts, so a file that kills the process (a crash,
    an OOM kill) is counted too; a clean drain (SIGTERM) takes its attempt back."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.files: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.files = {str(k): dict(v) for k, v in data.get("files", {}).items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            log.warning("%s is unreadable (%s); attempts start from zero", self.path, exc)

    def _save(self) -> None:
        atomic_write_json(self.path, {"version": 1, "files": self.files})

    def get(self, name: str) -> dict[str, Any]:
        return self.files.get(name, {"attempts": 0, "errors": []})

    def begin(self, name: str, sha256: str) -> int:
        """Count a new attempt for ``name`` (a different file under the same name starts over);
        returns the attempt's number (1 for the first)."""
        return self.begin_many([(name, sha256)])[0]

    def begin_many(self, files: list[tuple[str, str]]) -> list[int]:
        """:meth:`begin` for several (name, sha256), written once (a group of files)."""
        numbers = []
        for name, sha256 in files:
            entry = self.files.get(name)
            if entry is None or entry.get("sha256") != sha256:
                entry = self.files[name] = {"sha256": sha256, "attempts": 0, "errors": []}
            entry["attempts"] = int(entry.get("attempts", 0)) + 1
            entry["last_started_at"] = utc_now()
            numbers.append(entry["attempts"])
        if files:
            self._save()
        return numbers

    def undo(self, name: str) -> None:
        """The attempt was stopped on request, not failed: take it back."""
        self.undo_many([name])

    def undo_many(self, names: list[str]) -> None:
        changed = False
        for name in names:
            entry = self.files.get(name)
            if entry is not None:
                entry["attempts"] = max(0, int(entry.get("attempts", 0)) - 1)
                changed = True
        if changed:
            self._save()

    def error(self, name: str, exc: BaseException) -> None:
        self.error_many([name], exc)

    def error_many(self, names: list[str], exc: BaseException) -> None:
        """Note ``exc`` against each file (written once)."""
        for name in names:
            entry = self.files.setdefault(name, {"attempts": 0, "errors": []})
            entry.setdefault("errors", []).append({"at": utc_now(), "error": type(exc).__name__,
                                                   "message": str(exc)[:2000]})
            entry["errors"] = entry["errors"][-5:]
        if names:
            self._save()

    def clear(self, name: str) -> None:
        self.clear_many([name])

    def clear_many(self, names: list[str]) -> None:
        """Forget finished files (written once)."""
        if [self.files.pop(name, None) for name in names if name in self.files]:
            self._save()

    def keep_only(self, names: set[str]) -> None:
        stale = [n for n in self.files if n not in names]
        for name in stale:
            del self.files[name]
        if stale:
            self._save()


class JobBook:
    """Job records in the store's ``runs`` database, as run records named ``job-<key>``
    (written with the public :class:`~gpuengine.store.writer.StoreWriter` run API, between
    engine runs: one writer per store and process)."""

    def __init__(self, store: Path):
        self.store = Path(store)
        self._open: Any = None
        """The store while :meth:`reading` holds it open."""

    def get(self, key: str) -> dict[str, Any] | None:
        if self._open is not None:
            return self._open.run_record(key)
        if not (self.store / "data.mdb").exists():
            return None
        from gpuengine.store.writer import StoreWriter

        with StoreWriter(self.store) as writer:
            return writer.run_record(key)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Keep the store open for the :meth:`get` calls of the block (a group of files
        asks once per file; opening the store for each costs more than the question)."""
        if self._open is not None or not (self.store / "data.mdb").exists():
            yield
            return
        from gpuengine.store.writer import StoreWriter

        with StoreWriter(self.store) as writer:
            self._open = writer
            try:
                yield
            finally:
                self._open = None

    @staticmethod
    def run_record(key: str, record: dict[str, Any]) -> dict[str, Any]:
        """The job as a run record of the store's ``runs`` database."""
        now = utc_now()
        return {"run_id": key, "status": record["status"], "started_at": now,
                "updated_at": now, "finished_at": now, "info": record,
                "summary": record["counts"]}

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Store the job record on its own (when the run did not commit it)."""
        from gpuengine.store.writer import StoreWriter

        with StoreWriter(self.store) as writer:
            writer.begin_run(key, record)
            writer.finish_run(key, record["status"], record["counts"])
