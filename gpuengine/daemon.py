"""``gpuengine serve``: embed every FASTA file dropped into a watched directory, models loaded once.

Layout of the watched directory ``DIR`` (created at start; the four folders must be on one
filesystem, since files move between them by rename)::

    inbox/          producers put files here (contract in docs/daemon.md)
    processing/     claimed files: the one being embedded, and any waiting for a retry
    done/           finished files, each with NAME.job.json
    failed/         files that cannot be embedded, each with NAME.error.json
    status.json     the daemon's state, replaced atomically every --status-interval seconds
    attempts.json   attempts per file in processing/ (a poison file cannot loop across restarts)

The main thread runs everything except the status heartbeat (one thread) and the engine's own
threads:

1. Take the directory lock (one daemon per directory), create the folders, start the status
   thread (state ``loading``).
2. Warm up: embed one tiny built-in record into a throw-away store with the real options. This
   resolves the model, reads the weights and builds (and on GPUs calibrates) one replica per
   device into a :class:`~gpuengine.replicas.ReplicaPool` that every later run reuses. Model or
   option errors end the daemon here (exit 1), before any file is claimed. Then check that the
   store's table (if any) matches, send ``READY=1`` and enter state ``ready``.
3. Recover: finish every file left in ``processing/`` (a rerun is cheap: the engine skips the
   ids already in the store).
4. Loop: poll ``inbox/`` (:class:`InboxWatcher`), claim the oldest complete file with
   ``os.replace(inbox/x, processing/x)`` and process it; retries whose delay is over go first.

Processing one file (:meth:`Daemon.process`):

* sha256 of the file; its job key is a hash of that and the table's meaning (model checksum,
  outputs, dtype, truncation) plus ``--skip-invalid`` and ``--precision``. A job already
  finished in the store (a duplicate file, or a restart after the job record was written) goes
  straight to ``done/`` without running.
* Count the attempt in ``attempts.json`` *before* running; more than ``--max-attempts``
  started attempts (the daemon died each time) fail the file.
* ``run_embed`` on ``processing/x`` with the shared stop event and replica pool.
* Commit order: embeddings (by the engine, in its own transactions), then the job record (run
  record ``job-<key>`` in the store's ``runs`` database), then ``done/x.job.json``, then the
  move to ``done/``. A crash anywhere leaves the file in ``processing/``; the restart finds the
  job record, or reruns and finds every sequence stored. Nothing is lost or stored twice.
* ``InputError`` (bad record, not FASTA, truncated gzip): ``failed/`` with ``x.error.json`` at
  once. ``DeviceError``/``ModelLoadError``: the process itself is suspect; the file stays in
  ``processing/`` (attempt counted) and the daemon exits 1 so that systemd restarts it. Any
  other error: retried after ``--retry-delay`` (doubling), then ``failed/``.
* A stop request (SIGTERM/SIGINT) drains the run; the file stays in ``processing/`` and its
  attempt is not counted.

This module imports torch only inside functions, so ``gpuengine status`` stays fast.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from gpuengine import __version__, systemd
from gpuengine.config import EmbedConfig
from gpuengine.errors import (EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, DeviceError,
                              GpuEngineError, InputError, ModelLoadError, StoreMismatchError,
                              UsageError)
from gpuengine.progress import ProgressSink, ProgressSnapshot

log = logging.getLogger("gpuengine.daemon")

FOLDERS = ("inbox", "processing", "done", "failed")
STATUS_FILE = "status.json"
ATTEMPTS_FILE = "attempts.json"
LOCK_FILE = ".gpuengine-serve.lock"
WARMUP_PREFIX = ".warmup-"
MARKER_SUFFIX = ".done"
IGNORED_SUFFIXES = (".part", ".tmp", ".fai", ".fxi")
JOB_SUFFIX = ".job.json"
ERROR_SUFFIX = ".error.json"
JOB_PREFIX = "job-"
STALE_FACTOR = 3
"""``gpuengine status`` calls a heartbeat older than this many status intervals stale."""
WARMUP_RECORD = ">gpuengine-warmup\nACGTACGTACGTACGT\n"
"""Valid for every model family (protein and DNA alphabets both hold A, C, G, T)."""
TICK_NS = 50_000_000
"""Slack for coarse file timestamps (the kernel stamps files from a clock a tick behind)."""
MAX_LISTED_FAILURES = 1000


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# ----------------------------------------------------------------------------- pure helpers


def is_ignored(name: str) -> bool:
    """Names the inbox never takes: dot-files, ``*.part``, ``*.tmp``, ``*.fai``, ``*.fxi`` and
    markers (``*.done``)."""
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES) or name.endswith(MARKER_SUFFIX)


def marker_name(name: str) -> str:
    """The marker that says ``name`` is complete."""
    return name + MARKER_SUFFIX


def is_gzip(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def gzip_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is whole gzip data: every member (multi-member/BGZF too) ends, with its
    trailer, and the last one exactly at the end of the file. Decompresses into nothing."""
    decompressor = zlib.decompressobj(wbits=31)
    with open(path, "rb") as fh:
        data = b""
        while True:
            if not data:
                data = fh.read(1 << 20)
                if not data:
                    return decompressor.eof
            if decompressor.eof:  # the previous member ended: the rest starts another one
                decompressor = zlib.decompressobj(wbits=31)
            try:
                decompressor.decompress(data, 1 << 16)
            except zlib.error:
                return False
            data = decompressor.unused_data if decompressor.eof else decompressor.unconsumed_tail


def ends_with_newline(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) in (b"\n", b"\r")


def looks_complete(path: str | os.PathLike) -> bool:
    """The fallback's content check: whole gzip data, or plain text ending with a newline."""
    try:
        return gzip_complete(path) if is_gzip(path) else ends_with_newline(path)
    except OSError:
        return False


_TMP_COUNTER = itertools.count()


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON to a temporary file next to ``path``, fsync it, rename it over
    ``path``: readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_TMP_COUNTER)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, default=str, ensure_ascii=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def free_name(directory: Path, name: str) -> str:
    """``name``, or ``stem~N.ext...`` when ``directory`` already holds a file of that name
    (a later file of the same name never overwrites an earlier one in done/ or failed/)."""
    if not (directory / name).exists():
        return name
    head, dot, tail = name.partition(".")
    for k in itertools.count(2):
        candidate = f"{head}~{k}{dot}{tail}"
        if not (directory / candidate).exists():
            return candidate
    raise AssertionError("unreachable")


def problem_json(problem: Any) -> dict[str, Any]:
    """A :class:`~gpuengine.records.RecordProblem` as JSON."""
    return {"kind": problem.kind, "file": os.path.basename(problem.path), "path": problem.path,
            "line": problem.line, "column": problem.column, "record": problem.record_id,
            "index": problem.index, "character": problem.character, "detail": problem.detail,
            "message": problem.describe()}


_LINE_IN_MESSAGE = (re.compile(r":(\d+)(?::(\d+))?: "), re.compile(r"after line (\d+)"))


def error_record(name: str, exc: BaseException, *, kind: str, attempts: int,
                 sha256: str | None, errors: list | None = None) -> dict[str, Any]:
    """The ``NAME.error.json`` of a failed file: the reason, where (record, line, column,
    character, from the input report's problems, or the line named in the message) and the
    attempts."""
    record: dict[str, Any] = {
        "file": name, "sha256": sha256, "kind": kind, "reason": str(exc),
        "error": type(exc).__name__, "attempts": attempts, "failed_at": utc_now(),
        "record": None, "position": None, "daemon": {"pid": os.getpid(), "version": __version__}}
    report = getattr(exc, "report", None)
    problems = [problem_json(p) for p in getattr(report, "problems", ())]
    if problems:
        first = problems[0]
        record.update(record=first["record"], character=first["character"],
                      position={"line": first["line"], "column": first["column"]},
                      problems=problems[:100], problem_count=report.problem_count)
    else:
        for pattern in _LINE_IN_MESSAGE:
            match = pattern.search(str(exc))
            if match:
                column = match.group(2) if match.lastindex and match.lastindex > 1 else None
                record["position"] = {"line": int(match.group(1)),
                                      "column": int(column) if column else None}
                break
    if kind != "input":
        record["traceback"] = "".join(traceback.format_exception(type(exc), exc,
                                                                 exc.__traceback__))
    if errors:
        record["errors"] = errors
    return record


# ----------------------------------------------------------------------------- the inbox


@dataclass
class _Seen:
    signature: tuple[int, int, int, int]
    """(size, mtime_ns, ctime_ns, inode)"""
    since: float
    """Monotonic time this signature was first seen."""
    first_seen: float
    """Monotonic time the name was first seen (the claim order)."""
    polls: int = 1
    """Consecutive polls that saw this signature."""
    moved_in: bool = False
    """It appeared between two polls with an mtime older than the earlier poll."""
    complete: bool | None = None
    """The content check, cached for this signature."""
    warned: bool = False


class InboxWatcher:
    """Which inbox files are complete, decided from polls of ``os.scandir`` (the only source
    of truth: nothing is lost across restarts or event-queue overflows, and it works on every
    filesystem). A file (regular, not :func:`is_ignored`) is ready when:

    * its marker ``NAME.done`` exists: at once; or
    * it was renamed or linked into place, and two polls in a row saw it unchanged. Evidence
      of a rename: its ctime is later than its mtime (a rename or link stamps ctime, a write
      stamps both), or it appeared since the previous poll with an mtime older than that
      poll (it was written elsewhere). A rename in the same clock tick as the last write
      shows neither and falls through to the next rule; or
    * (fallback) size, mtime, ctime and inode unchanged for ``settle`` seconds (two polls at
      least that far apart) *and* the content looks complete: plain text ending with a
      newline, or whole gzip data. A stable but incomplete file waits (one warning).
    """

    def __init__(self, inbox: Path, settle: float, *, clock: Callable[[], float] = time.monotonic,
                 wall_ns: Callable[[], int] = time.time_ns):
        self.inbox = Path(inbox)
        self.settle = settle
        self._clock = clock
        self._wall_ns = wall_ns
        self._seen: dict[str, _Seen] = {}
        self._previous_poll_ns: int | None = None
        self.depth = 0
        """Files in the inbox at the last poll (ignored names excluded)."""
        self.waiting: list[str] = []
        """Files stable for ``settle`` seconds but not complete at the last poll."""

    def poll(self) -> list[str]:
        """Names ready to claim, oldest first."""
        now = self._clock()
        started_ns = self._wall_ns()
        files: dict[str, tuple[int, int, int, int]] = {}
        markers: set[str] = set()
        with os.scandir(self.inbox) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                if name.endswith(MARKER_SUFFIX):
                    markers.add(name[:-len(MARKER_SUFFIX)])
                    continue
                if is_ignored(name):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                files[name] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        for name in [n for n in self._seen if n not in files]:
            del self._seen[name]
        previous = self._previous_poll_ns
        ready, waiting = [], []
        for name, signature in files.items():
            seen = self._seen.get(name)
            if seen is None:
                moved = previous is not None and signature[1] < previous - TICK_NS
                seen = self._seen[name] = _Seen(signature, now, now, moved_in=moved)
            elif seen.signature != signature:
                seen = self._seen[name] = _Seen(signature, now, seen.first_seen)
            else:
                seen.polls += 1
            verdict = self._verdict(name, seen, name in markers, now)
            if verdict == "ready":
                ready.append(name)
            elif verdict == "waiting":
                waiting.append(name)
        self._previous_poll_ns = started_ns
        self.depth = len(files)
        self.waiting = sorted(waiting)
        ready.sort(key=lambda n: (self._seen[n].first_seen, n))
        return ready

    def _verdict(self, name: str, seen: _Seen, marked: bool, now: float) -> str:
        if marked:
            return "ready"
        if seen.polls < 2:
            return "new"
        size, mtime, ctime, _ = seen.signature
        if seen.moved_in or ctime > mtime:
            return "ready"
        if now - seen.since < self.settle:
            return "settling"
        if seen.complete is None:
            seen.complete = looks_complete(self.inbox / name)
        if seen.complete:
            return "ready"
        if not seen.warned:
            seen.warned = True
            log.warning("inbox/%s has not changed for %.0f s but looks incomplete (%s); waiting "
                        "for more data. To take it as it is, create inbox/%s", name, self.settle,
                        "empty" if size == 0 else "not whole gzip data or no final newline",
                        marker_name(name))
        return "waiting"

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)


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

    def put(self, key: str, record: dict[str, Any], status: str,
            engine_run_id: str | None) -> dict[str, Any] | None:
        """Store the job record; returns the engine's run record of ``engine_run_id``."""
        from gpuengine.store.writer import StoreWriter

        with StoreWriter(self.store) as writer:
            engine_run = writer.run_record(engine_run_id) if engine_run_id else None
            if engine_run is not None:
                record["engine_run"] = {k: engine_run.get(k) for k in (
                    "run_id", "status", "committed_sequences", "committed_records", "resumes",
                    "started_at")}
            writer.begin_run(key, record)
            writer.finish_run(key, status, record["counts"])
        return engine_run


# ----------------------------------------------------------------------------- status


class StatusBoard:
    """The daemon's state, written to ``status.json`` (atomically) by a heartbeat thread every
    ``interval`` seconds and at each change of state; each write also updates systemd's
    ``STATUS=`` line. The heartbeat proves the process is alive; ``progress_at`` shows when the
    main loop or a run last moved."""

    def __init__(self, directory: Path, interval: float,
                 notify: Callable[[str], Any] = systemd.notify,
                 memories: Callable[[], list] = lambda: []):
        self.path = Path(directory) / STATUS_FILE
        self.interval = interval
        self._notify = notify
        self._memories = memories
        self._lock = threading.RLock()
        self._write_lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_line = ""
        self.data: dict[str, Any] = {
            "pid": os.getpid(), "version": __version__, "state": "loading",
            "started_at": utc_now(), "watch": str(directory), "store": None, "model": None,
            "status_interval": interval, "stale_after_seconds": STALE_FACTOR * interval,
            "queue": 0, "waiting": [], "processing": None, "retrying": [],
            "files_done": 0, "files_failed": 0, "last_file": None, "last_run": None,
            "sequences_per_second": None, "devices": [], "gpu_memory": [],
            "last_error": None, "exit_code": None, "progress_at": utc_now()}

    @property
    def state(self) -> str:
        with self._lock:
            return self.data["state"]

    def update(self, **fields: Any) -> None:
        with self._lock:
            self.data.update(fields)
            self.data["progress_at"] = utc_now()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.data[key] += n

    def update_processing(self, **fields: Any) -> None:
        with self._lock:
            if self.data["processing"] is not None:
                self.data["processing"].update(fields)
            self.data["progress_at"] = utc_now()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            data = json.loads(json.dumps(self.data, default=str))
        gpus = []
        for memory in self._memories():
            try:
                gpus.append(memory.describe())
            except Exception:  # telemetry is best effort
                pass
        if gpus:
            data["gpu_memory"] = gpus
        now = time.time()
        data["heartbeat"] = datetime.fromtimestamp(now, timezone.utc).isoformat(
            timespec="milliseconds")
        data["heartbeat_unix"] = now
        return data

    def write(self) -> None:
        with self._write_lock:
            data = self.snapshot()
            atomic_write_json(self.path, data)
        line = status_line(data)
        if line != self._last_line:
            self._last_line = line
            self._notify("STATUS=" + line)

    def start(self) -> None:
        self.write()
        self._thread = threading.Thread(target=self._beat, name="gpuengine-status", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.write()
            except Exception as exc:  # a full disk must not stop the daemon
                log.warning("cannot write %s: %s", self.path, exc)

    def close(self, **fields: Any) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self.update(**fields)
        try:
            self.write()
        except Exception as exc:
            log.warning("cannot write %s: %s", self.path, exc)


def status_line(data: dict[str, Any]) -> str:
    """One line for ``systemctl status`` and logs."""
    parts = [data.get("state", "?")]
    current = data.get("processing")
    if current:
        parts.append(f"embedding {current.get('file')} ({current.get('committed_records', 0)}"
                     f"/{current.get('total_records', '?')} records)")
    parts.append(f"queue {data.get('queue', 0)}")
    parts.append(f"{data.get('files_done', 0)} done, {data.get('files_failed', 0)} failed")
    return "; ".join(parts)


class _FileProgress(ProgressSink):
    """Feeds a run's progress into the status board."""

    def __init__(self, board: StatusBoard, loading: bool = False):
        self.board = board
        self.loading = loading

    def stage(self, message: str) -> None:
        (log.info if self.loading else log.debug)("%s", message)
        if self.loading:
            self.board.update(stage=message)
        else:
            self.board.update_processing(stage=message)

    def start(self, total_records: int, total_residues: int) -> None:
        self.board.update_processing(total_records=total_records, stage="embedding")

    def update(self, snapshot: ProgressSnapshot) -> None:
        self.board.update_processing(committed_records=snapshot.committed_records,
                                     total_records=snapshot.total_records)


# ----------------------------------------------------------------------------- the daemon


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``gpuengine serve`` needs. ``embed`` is the template of every run: its
    ``inputs`` are replaced by the claimed file (build it with any placeholder input)."""

    watch: Path
    embed: EmbedConfig
    poll_interval: float = 2.0
    """Seconds between polls of the inbox."""
    settle: float = 5.0
    """The fallback: seconds a file must stay unchanged (and look complete) to be taken."""
    max_attempts: int = 3
    """Attempts per file before it goes to failed/ (input errors fail at once)."""
    status_interval: float = 5.0
    """Seconds between status.json heartbeats; ``gpuengine status`` calls 3x this stale."""
    retry_delay: float = 10.0
    """Seconds before the first retry of a file after an error; doubles each attempt, 10 min
    at most."""

    def __post_init__(self) -> None:
        if self.poll_interval <= 0:
            raise UsageError(f"--poll-interval must be positive (got {self.poll_interval})")
        if self.settle < 0:
            raise UsageError(f"--settle must not be negative (got {self.settle})")
        if self.max_attempts < 1:
            raise UsageError(f"--max-attempts must be at least 1 (got {self.max_attempts})")
        if self.status_interval <= 0:
            raise UsageError(f"--status-interval must be positive (got {self.status_interval})")
        if self.retry_delay < 0:
            raise UsageError(f"--retry-delay must not be negative (got {self.retry_delay})")


class DaemonExit(Exception):
    """Leave the daemon with ``code`` (after writing the final status)."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message)
        self.code = code


RunFunction = Callable[..., Any]
"""``run(config, progress, stop, replicas=pool) -> RunSummary`` (engine.run_embed)."""


class Daemon:
    def __init__(self, config: ServeConfig, *, stop: threading.Event | None = None,
                 run: RunFunction | None = None,
                 notify: Callable[[str], Any] = systemd.notify):
        self.config = config
        self.dir = Path(config.watch)
        self.inbox, self.processing, self.done, self.failed = (self.dir / f for f in FOLDERS)
        self.stop = stop or threading.Event()
        self._run = run
        self._notify = notify
        self.pool = None
        self.table_spec = None
        self.identity: dict[str, Any] = {}
        self.attempts = AttemptBook(self.dir / ATTEMPTS_FILE)
        self.jobs = JobBook(config.embed.out)
        self.board = StatusBoard(self.dir, config.status_interval, notify,
                                 memories=lambda: self.pool.memories() if self.pool else [])
        self.board.update(store=str(config.embed.out), model=config.embed.model)
        self.watcher = InboxWatcher(self.inbox, config.settle)
        self.retry_at: dict[str, float] = {}
        self._lock_fd: int | None = None

    # -- whole life ----------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until stopped, return the exit code (0 after a clean stop)."""
        code = EXIT_OK
        try:
            self.prepare()
            self.board.start()
            self.warm_up()
            self.check_store()
            self.board.update(state="ready", stage=None)
            self.board.write()
            self._notify("READY=1")
            log.info("ready: watching %s/inbox, store %s", self.dir, self.config.embed.out)
            self.recover()
            self.loop()
            log.info("stopped")
        except DaemonExit as exc:
            code = exc.code
        except GpuEngineError as exc:
            log.error("%s", exc)
            self.board.update(last_error={"at": utc_now(), "file": None, "message": str(exc)})
            code = exc.exit_code
        except Exception as exc:
            log.exception("the daemon failed")
            self.board.update(last_error={"at": utc_now(), "file": None,
                                          "message": f"{type(exc).__name__}: {exc}"})
            code = EXIT_ERROR
        finally:
            self.board.close(state="stopped", processing=None, exit_code=code)
            self._unlock()
        return code

    def request_stop(self, reason: str) -> None:
        """Called from the signal handler: stop claiming, drain the current run, exit 0."""
        self.stop.set()
        self._notify("STOPPING=1")
        if self.board.state == "loading":
            # nothing is claimed yet and a model load cannot be interrupted: leave now
            log.warning("%s while loading the model: exiting", reason)
            self.board.close(state="stopped", exit_code=EXIT_OK)
            os._exit(EXIT_OK)
        log.warning("%s: finishing the batches in flight, committing, then exiting (send it "
                    "again to quit at once)", reason)
        self.board.update(state="draining")
        threading.Thread(target=self._write_quietly, daemon=True).start()

    def _write_quietly(self) -> None:
        try:
            self.board.write()
        except Exception:
            pass

    # -- start-up ------------------------------------------------------------------------

    def prepare(self) -> None:
        """Lock the directory, create the folders (one filesystem), clean up leftovers."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        for folder in (self.inbox, self.processing, self.done, self.failed):
            folder.mkdir(exist_ok=True)
        devices = {os.stat(f).st_dev for f in (self.inbox, self.processing, self.done,
                                                self.failed)}
        if len(devices) > 1:
            raise UsageError(f"{self.dir}: inbox/, processing/, done/ and failed/ must be on one "
                             "filesystem (files move between them by rename)")
        for leftover in self.dir.glob(WARMUP_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in self.dir.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        self.attempts.keep_only({n for n in os.listdir(self.processing) if not is_ignored(n)})

    def _lock(self) -> None:
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise GpuEngineError(f"another gpuengine serve (pid {holder}) is watching {self.dir}; "
                                 "one daemon per directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _call_run(self, config: EmbedConfig, progress: ProgressSink):
        if self._run is None:
            from gpuengine.engine import run_embed

            self._run = run_embed
        return self._run(config, progress, self.stop, replicas=self.pool)

    def warm_up(self) -> None:
        """Load the model on every device: one tiny record into a throw-away store, with the
        real options (so the replicas built are the ones every run reuses)."""
        from gpuengine.replicas import ReplicaPool
        from gpuengine.store.reader import EmbeddingStore

        self.pool = ReplicaPool()
        started = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=WARMUP_PREFIX, dir=self.dir))
        try:
            fasta = tmp / "warmup.fa"
            fasta.write_text(WARMUP_RECORD)
            config = dataclasses.replace(self.config.embed, inputs=(fasta,),
                                         out=tmp / "store.lmdb", skip_invalid=False)
            summary = self._call_run(config, _FileProgress(self.board, loading=True))
            if summary.interrupted:
                raise DaemonExit(EXIT_OK)
            with EmbeddingStore(config.out, table=config.table) as store:
                self.table_spec = store.spec
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        spec = self.table_spec
        self.identity = {"table": spec.name, "model_fingerprint": spec.model.fingerprint().hex(),
                         "outputs": sorted(o.label for o in spec.outputs),
                         "store_dtype": spec.store_dtype, "max_residues": spec.max_residues,
                         "skip_invalid": self.config.embed.skip_invalid,
                         "precision": self.config.embed.precision}
        self.board.update(model={"name": spec.model.name, "family": spec.model.family,
                                 "sha256": spec.model.sha256, "table": spec.name,
                                 "outputs": [o.label for o in spec.outputs]},
                          devices=summary.devices)
        log.info("model %s loaded on %s in %.1f s", spec.model.name,
                 ", ".join(d["device"] for d in summary.devices) or "?",
                 time.perf_counter() - started)

    def check_store(self) -> None:
        """Refuse to start on a store whose table means something else (rather than failing
        every file)."""
        from gpuengine.store.writer import StoreWriter

        with StoreWriter(self.config.embed.out) as writer:
            stored = writer.stored_spec(self.table_spec.name)
        if stored is not None:
            diffs = stored.differences(self.table_spec)
            if diffs:
                raise StoreMismatchError(
                    f"store {self.config.embed.out} table {self.table_spec.name!r} holds "
                    f"{stored.describe()}; the daemon's options ask for "
                    f"{self.table_spec.describe()} ({'; '.join(diffs)}); use another --table "
                    "or --store")

    def recover(self) -> None:
        """Finish every file a previous daemon left in ``processing/``."""
        names = sorted(n for n in os.listdir(self.processing) if not is_ignored(n))
        if names:
            log.info("recovering %d file(s) left in processing/", len(names))
        for name in names:
            if self.stop.is_set():
                return
            (self.inbox / marker_name(name)).unlink(missing_ok=True)
            self.process(name)

    # -- the loop ------------------------------------------------------------------------

    def loop(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            due = sorted((t, n) for n, t in self.retry_at.items() if t <= now)
            if due:
                self.process(due[0][1])
                continue
            ready = self.watcher.poll()
            self.board.update(queue=self.watcher.depth, waiting=self.watcher.waiting,
                              retrying=sorted(self.retry_at))
            worked = False
            for name in ready:
                if self.stop.is_set():
                    break
                if self.claim(name):
                    self.process(name)
                    worked = True
                    break  # poll again: retries and fresher state first
            if not worked:
                self.stop.wait(self.config.poll_interval)

    def claim(self, name: str) -> bool:
        """``os.replace(inbox/x, processing/x)``; False if it is gone or the name is busy."""
        self.watcher.forget(name)
        if (self.processing / name).exists():
            log.warning("inbox/%s waits: a file of that name is still in processing/", name)
            return False
        try:
            os.replace(self.inbox / name, self.processing / name)
        except FileNotFoundError:
            return False
        (self.inbox / marker_name(name)).unlink(missing_ok=True)
        log.info("claimed %s", name)
        return True

    # -- one file ------------------------------------------------------------------------

    def job_key(self, sha256: str) -> str:
        text = json.dumps({"sha256": sha256, **self.identity}, sort_keys=True, default=str)
        return JOB_PREFIX + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def process(self, name: str) -> None:
        """Embed ``processing/name`` and move it to done/ or failed/ (or leave it there for a
        retry or after a stop request)."""
        self.retry_at.pop(name, None)
        path = self.processing / name
        started = time.perf_counter()
        try:
            sha256 = file_sha256(path)
        except FileNotFoundError:
            self.attempts.clear(name)
            return
        except OSError as exc:  # unreadable (permissions, I/O error): a problem of the file
            self._fail(name, InputError(f"{name}: cannot read it: {exc}"), kind="input",
                       attempts=self.attempts.get(name).get("attempts", 0), sha256=None)
            return
        key = self.job_key(sha256)
        previous = self.jobs.get(key)
        if previous is not None and previous.get("status") in ("complete", "partial"):
            self._finish_reused(name, sha256, key, previous)
            return
        book = self.attempts.get(name)
        if book.get("sha256") == sha256 and book.get("attempts", 0) >= self.config.max_attempts:
            errors = book.get("errors", [])
            last = errors[-1]["message"] if errors else "no error was recorded"
            exc = GpuEngineError(f"gave up after {book['attempts']} attempts that did not "
                                 f"finish (the daemon stopped or died during each); last "
                                 f"error: {last}")
            self._fail(name, exc, kind="error", attempts=book["attempts"], sha256=sha256,
                       errors=errors)
            return
        attempt = self.attempts.begin(name, sha256)
        self.board.update(processing={"file": name, "attempt": attempt, "since": utc_now(),
                                      "committed_records": 0, "total_records": None,
                                      "stage": "starting"})
        config = dataclasses.replace(self.config.embed, inputs=(path.resolve(),))
        try:
            summary = self._call_run(config, _FileProgress(self.board))
        except InputError as exc:
            self._fail(name, exc, kind="input", attempts=attempt, sha256=sha256)
            return
        except (DeviceError, ModelLoadError) as exc:
            self.attempts.error(name, exc)
            self._record_error(name, exc)
            log.error("%s: %s; exiting so that the service manager restarts the daemon with "
                      "fresh devices (the file stays in processing/, attempt %d of %d)",
                      name, exc, attempt, self.config.max_attempts)
            raise DaemonExit(EXIT_ERROR) from exc
        except Exception as exc:
            self._retry_or_fail(name, exc, attempt, sha256)
            return
        finally:
            self.board.update(processing=None)
        if summary.interrupted:
            self.attempts.undo(name)
            log.info("%s: stopped on request after %d records; it stays in processing/ and is "
                     "finished at the next start", name, summary.committed_records)
            return
        try:
            self._finish(name, sha256, key, summary, attempt, config,
                         time.perf_counter() - started)
        except Exception as exc:
            self._retry_or_fail(name, exc, attempt, sha256)

    def _record_error(self, name: str, exc: BaseException) -> None:
        self.board.update(last_error={"at": utc_now(), "file": name,
                                      "message": f"{type(exc).__name__}: {exc}"[:4000]})

    def _retry_or_fail(self, name: str, exc: Exception, attempt: int, sha256: str) -> None:
        self.attempts.error(name, exc)
        self._record_error(name, exc)
        if self.pool is not None:
            self.pool.clear()  # a broken replica is rebuilt by the next run
        if attempt >= self.config.max_attempts:
            log.error("%s: %s: %s (attempt %d of %d): giving up", name, type(exc).__name__, exc,
                      attempt, self.config.max_attempts)
            self._fail(name, exc, kind="error", attempts=attempt, sha256=sha256,
                       errors=self.attempts.get(name).get("errors"))
            return
        delay = min(600.0, self.config.retry_delay * 2 ** (attempt - 1))
        log.error("%s: %s: %s (attempt %d of %d); retrying in %.0f s", name,
                  type(exc).__name__, exc, attempt, self.config.max_attempts, delay,
                  exc_info=log.isEnabledFor(logging.DEBUG))
        self.retry_at[name] = time.monotonic() + delay

    def _fail(self, name: str, exc: BaseException, *, kind: str, attempts: int,
              sha256: str | None, errors: list | None = None) -> None:
        target = free_name(self.failed, name)
        record = error_record(name, exc, kind=kind, attempts=attempts, sha256=sha256,
                              errors=errors)
        record["moved_to"] = f"failed/{target}"
        atomic_write_json(self.failed / (target + ERROR_SUFFIX), record)
        os.replace(self.processing / name, self.failed / target)
        self.attempts.clear(name)
        self.board.add("files_failed")
        self.board.update(last_file={"file": name, "result": "failed", "at": utc_now()})
        self._record_error(name, exc)
        if kind == "input":
            log.error("%s -> failed/%s: %s", name, target, exc)

    def _finish(self, name: str, sha256: str, key: str, summary: Any, attempt: int,
                config: EmbedConfig, seconds: float) -> None:
        status = "partial" if summary.failed else "complete"
        seq_rate = summary.embedded / summary.embed_seconds if summary.embed_seconds else 0.0
        counts = {k: getattr(summary, k) for k in (
            "records_read", "valid_records", "invalid_skipped", "duplicate_records", "truncated",
            "already_stored", "deduplicated", "embedded", "committed_records")}
        record = {
            "job": key, "file": name, "sha256": sha256, "size": os.path.getsize(
                self.processing / name), "status": status, "exit_code": summary.exit_code,
            "store": str(self.config.embed.out), "table": summary.table,
            "model": {"name": self.table_spec.model.name if self.table_spec else summary.model,
                      "sha256": self.table_spec.model.sha256 if self.table_spec else None,
                      "synthetic_weights": summary.synthetic_weights},
            "options": self.options(), "counts": counts,
            "failed_count": len(summary.failed),
            "failed": [{"id": rid, "reason": why}
                       for rid, why in summary.failed[:MAX_LISTED_FAILURES]],
            "seconds": round(seconds, 3), "embed_seconds": summary.embed_seconds,
            "sequences_per_second": seq_rate, "tokens_per_second": summary.tokens_per_second,
            "devices": summary.devices, "attempts": attempt, "finished_at": utc_now(),
            "versions": versions(), "daemon_pid": os.getpid()}
        self.jobs.put(key, record, status, self._engine_run_id(config))
        target = free_name(self.done, name)
        record["done_as"] = f"done/{target}"
        atomic_write_json(self.done / (target + JOB_SUFFIX), record)
        os.replace(self.processing / name, self.done / target)
        self.attempts.clear(name)
        self.board.add("files_done")
        self.board.update(last_file={"file": name, "result": status, "at": utc_now()},
                          last_run={"file": name, "seconds": round(seconds, 3), **counts,
                                    "failed": len(summary.failed)},
                          sequences_per_second=seq_rate, devices=summary.devices)
        log.info("%s -> done/%s: %d records (%d embedded, %d already stored)%s in %.1f s", name,
                 target, summary.committed_records + summary.already_stored, summary.embedded,
                 summary.already_stored,
                 f", {len(summary.failed)} sequences failed" if summary.failed else "", seconds)

    def _finish_reused(self, name: str, sha256: str, key: str, previous: dict) -> None:
        """The job is finished in the store: this file's own job (a restart after the job
        record was committed), or an identical earlier file's (a duplicate)."""
        first = previous.get("info", {})
        target = free_name(self.done, name)
        if first.get("file") == name and first.get("sha256") == sha256:
            record = {**first, "done_as": f"done/{target}", "recovered_at": utc_now()}
            how = "its job record was already in the store"
        else:
            record = {"job": key, "file": name, "sha256": sha256, "status": previous["status"],
                      "reused": True, "note": "a job with identical content and options is "
                      "already finished in the store: nothing was recomputed",
                      "first_file": first.get("file"),
                      "first_finished_at": first.get("finished_at"),
                      "counts": first.get("counts"), "failed_count": first.get("failed_count"),
                      "finished_at": utc_now(), "done_as": f"done/{target}",
                      "versions": versions()}
            how = f"identical to the finished job of {first.get('file')}; nothing to compute"
        atomic_write_json(self.done / (target + JOB_SUFFIX), record)
        os.replace(self.processing / name, self.done / target)
        self.attempts.clear(name)
        self.board.add("files_done")
        self.board.update(last_file={"file": name, "result": "reused" if record.get("reused")
                                     else record.get("status"), "at": utc_now()})
        log.info("%s -> done/%s: %s", name, target, how)

    def _engine_run_id(self, config: EmbedConfig) -> str | None:
        """The engine's run id of ``config`` (its run record counts every resume)."""
        if self.table_spec is None:
            return None
        try:
            from gpuengine.engine import _run_id

            return _run_id(config, self.table_spec)
        except Exception:  # informational only
            return None

    def options(self) -> dict[str, Any]:
        e = self.config.embed
        return {"model": e.model, "table": e.table, "layers": list(e.layers),
                "pools": list(e.pools), "precision": e.precision, "store_dtype": e.store_dtype,
                "max_residues": e.max_residues, "skip_invalid": e.skip_invalid,
                "gpus": e.devices, "max_tokens": e.max_tokens}


def versions() -> dict[str, str]:
    import platform

    found = {"gpuengine": __version__, "python": platform.python_version()}
    for module in ("torch", "lmdb", "numpy"):
        mod = sys.modules.get(module)
        if mod is not None:
            found[module] = getattr(mod, "__version__", "?")
    return found


# ----------------------------------------------------------------------------- entry points


class _Signals:
    """SIGTERM/SIGINT: drain (``Daemon.request_stop``); a second one: ``os._exit(130)``."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.daemon.stop.is_set():
            os._exit(EXIT_INTERRUPTED)
        self.daemon.request_stop(signal.Signals(signum).name)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Plain lines on stderr (journald adds its own metadata; no wrapping, no colour)."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def serve(config: ServeConfig, *, verbose: int = 0, quiet: bool = False) -> int:
    """``gpuengine serve``: run the daemon in this (main) thread; returns the exit code."""
    setup_logging(verbose, quiet)
    daemon = Daemon(config)
    with _Signals(daemon):
        return daemon.run()


def read_status(directory: str | os.PathLike) -> dict[str, Any]:
    """The status file of a watched directory (or the file itself)."""
    path = Path(directory)
    if path.is_dir():
        path = path / STATUS_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GpuEngineError(f"no status file at {path}: no gpuengine serve has run on this "
                             "directory") from None
    except (OSError, ValueError) as exc:
        raise GpuEngineError(f"cannot read {path}: {exc}") from None


def check_status(data: dict[str, Any], now: float | None = None) -> tuple[bool, str]:
    """(healthy, one-line verdict): fresh heartbeat and not stopped."""
    now = time.time() if now is None else now
    age = now - float(data.get("heartbeat_unix", 0.0))
    interval = float(data.get("status_interval", 5.0))
    limit = STALE_FACTOR * interval
    pid = data.get("pid")
    if data.get("state") == "stopped":
        return False, (f"not running: the daemon (pid {pid}) stopped at {data.get('heartbeat')} "
                       f"with exit code {data.get('exit_code')}")
    if age > limit:
        alive = _pid_alive(pid)
        why = ("it is still running but not writing its status (hung, or its disk is full?)"
               if alive else "that process is gone (killed or crashed)")
        return False, (f"stale heartbeat: status.json was last written {age:.0f} s ago, more than "
                       f"{STALE_FACTOR} x the {interval:g} s status interval; pid {pid}: {why}")
    return True, f"{data.get('state')}: heartbeat {max(age, 0):.1f} s ago"


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def format_status(data: dict[str, Any], verdict: str) -> str:
    lines = [f"gpuengine serve {data.get('version')} (pid {data.get('pid')}) on {data.get('watch')}",
             f"  state      {verdict}"]
    model = data.get("model")
    if isinstance(model, dict):
        lines.append(f"  model      {model.get('name')} (table {model.get('table')}, "
                     f"{', '.join(model.get('outputs', []))})")
    lines.append(f"  store      {data.get('store')}")
    lines.append(f"  queue      {data.get('queue', 0)} in inbox"
                 + (f", {len(data['waiting'])} waiting (incomplete)" if data.get("waiting") else "")
                 + (f", {len(data['retrying'])} to retry" if data.get("retrying") else ""))
    current = data.get("processing")
    if current:
        lines.append(f"  embedding  {current.get('file')}: {current.get('committed_records', 0)} "
                     f"of {current.get('total_records', '?')} records (attempt "
                     f"{current.get('attempt')}, {current.get('stage')})")
    lines.append(f"  files      {data.get('files_done', 0)} done, {data.get('files_failed', 0)} "
                 "failed since the start")
    if data.get("sequences_per_second") is not None:
        lines.append(f"  last run   {data['sequences_per_second']:.1f} sequences/s")
    for gpu in data.get("gpu_memory", []):
        lines.append(f"  {gpu.get('device')}  {gpu.get('free_bytes', 0) / 2**30:.1f} GiB free of "
                     f"{gpu.get('total_bytes', 0) / 2**30:.1f} GiB, budget "
                     f"{gpu.get('budget_tokens')} tokens")
    error = data.get("last_error")
    if error:
        lines.append(f"  last error {error.get('at')} {error.get('file') or ''}: "
                     f"{str(error.get('message')).splitlines()[0] if error.get('message') else ''}")
    return "\n".join(lines)


def status_command(directory: str | os.PathLike, as_json: bool = False) -> int:
    """``gpuengine status DIR``: print the status; exit 1 when stale, stopped or missing."""
    try:
        data = read_status(directory)
    except GpuEngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    healthy, verdict = check_status(data)
    if as_json:
        print(json.dumps({**data, "healthy": healthy, "verdict": verdict}, indent=2))
    else:
        print(format_status(data, verdict))
    if not healthy:
        print(f"error: {verdict}", file=sys.stderr)
    return EXIT_OK if healthy else EXIT_ERROR
