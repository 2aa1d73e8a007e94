"""State the daemon keeps on disk: attempts per file, and job records."""

from __future__ import annotations

import json
import logging
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
        entry = self.files.get(name)
        if entry is None or entry.get("sha256") != sha256:
            entry = self.files[name] = {"sha256": sha256, "attempts": 0, "errors": []}
        entry["attempts"] = int(entry.get("attempts", 0)) + 1
        entry["last_started_at"] = utc_now()
        self._save()
        return entry["attempts"]

    def undo(self, name: str) -> None:
        """The attempt was stopped on request, not failed: take it back."""
        entry = self.files.get(name)
        if entry is not None:
            entry["attempts"] = max(0, int(entry.get("attempts", 0)) - 1)
            self._save()

    def error(self, name: str, exc: BaseException) -> None:
        entry = self.files.setdefault(name, {"attempts": 0, "errors": []})
        entry.setdefault("errors", []).append({"at": utc_now(), "error": type(exc).__name__,
                                               "message": str(exc)[:2000]})
        entry["errors"] = entry["errors"][-5:]
        self._save()

    def clear(self, name: str) -> None:
        if self.files.pop(name, None) is not None:
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

    def get(self, key: str) -> dict[str, Any] | None:
        if not (self.store / "data.mdb").exists():
            return None
        from gpuengine.store.writer import StoreWriter

        with StoreWriter(self.store) as writer:
            return writer.run_record(key)

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
