"""The status file (``status.json``) and ``gpuengine status``."""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from gpuengine import __version__, systemd
from gpuengine.errors import (EXIT_ERROR, EXIT_OK, GpuEngineError)
from gpuengine.progress import ProgressSink, ProgressSnapshot
from gpuengine.daemon.constants import STALE_FACTOR, STATUS_FILE
from gpuengine.daemon.files import atomic_write_json, utc_now

LATENCY_WINDOW = 1000
"""Files the latency figures of ``status.json`` cover."""

log = logging.getLogger("gpuengine.daemon")

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
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.data: dict[str, Any] = {
            "pid": os.getpid(), "version": __version__, "state": "loading",
            "started_at": utc_now(), "watch": str(directory), "store": None, "model": None,
            "status_interval": interval, "stale_after_seconds": STALE_FACTOR * interval,
            "queue": 0, "waiting": [], "processing": None, "retrying": [],
            "files_done": 0, "files_failed": 0, "last_file": None, "last_run": None,
            "sequences_per_second": None, "file_latency_seconds": None,
            "devices": [], "gpu_memory": [],
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

    def file_latency(self, seconds: float) -> None:
        """A file went to done/ ``seconds`` after it was claimed: ``file_latency_seconds``
        shows the median and 90th percentile over the last :data:`LATENCY_WINDOW` files."""
        with self._lock:
            self._latencies.append(seconds)
            ordered = sorted(self._latencies)
            n = len(ordered)
            self.data["file_latency_seconds"] = {
                "median": round(statistics.median(ordered), 3),
                "p90": round(ordered[min(n - 1, int(0.9 * n))], 3), "files": n}

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


def _what(current: dict[str, Any]) -> str:
    """The file being embedded, or a group: ``a.fa and 199 more files (37 of 200 done)``."""
    group = current.get("group")
    if not isinstance(group, dict):
        return str(current.get("file"))
    return (f"{current.get('file')} and {max(0, group.get('pending', 1) - 1)} more files "
            f"({group.get('done', 0)} of {group.get('files', '?')} done)")


def _done(current: dict[str, Any]) -> int:
    """Records with nothing left to do (as the progress bar counts them); a status file of
    an older daemon has only ``committed_records``."""
    return current.get("done_records", current.get("committed_records", 0))


def status_line(data: dict[str, Any]) -> str:
    """One line for ``systemctl status`` and logs."""
    parts = [data.get("state", "?")]
    current = data.get("processing")
    if current:
        parts.append(f"embedding {_what(current)} ({_done(current)}"
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
        """Counted as the progress bar counts (:class:`~gpuengine.display.RichProgress`):
        ``done_records`` (stored before, committed now or failed) of ``total_records`` (every
        valid record), so a resumed file starts where the stopped run left it and a finished
        one ends at total/total; ``committed_records`` is this run's part of it."""
        self.board.update_processing(done_records=snapshot.done_records,
                                     committed_records=snapshot.committed_records,
                                     stored_records=snapshot.stored_records,
                                     failed_records=snapshot.failed_records,
                                     total_records=snapshot.total_records)



def read_status(directory: str | os.PathLike) -> dict[str, Any]:
    """The status file of a watched directory (or the file itself)."""
    path = Path(directory)
    if path.is_dir():
        path = path / STATUS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GpuEngineError(f"no status file at {path}: no gpuengine serve has run on this "
                             "directory") from None
    except (OSError, ValueError) as exc:
        raise GpuEngineError(f"cannot read {path}: {exc}") from None
    if isinstance(data, dict):
        try:  # the fields check_status computes with must be numbers
            float(data.get("heartbeat_unix", 0.0))
            float(data.get("status_interval", 5.0))
        except (TypeError, ValueError):
            pass
        else:
            return data
    raise GpuEngineError(f"{path} is not a gpuengine status file (no numeric heartbeat_unix "
                         "and status_interval)")


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
    lines = [f"gpuengine serve {data.get('version')} (pid {data.get('pid')}) on "
             f"{data.get('watch')}", f"  state      {verdict}"]
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
        lines.append(f"  embedding  {_what(current)}: {_done(current)} "
                     f"of {current.get('total_records', '?')} records done (attempt "
                     f"{current.get('attempt')}, {current.get('stage')})")
    lines.append(f"  files      {data.get('files_done', 0)} done, {data.get('files_failed', 0)} "
                 "failed since the start")
    if data.get("sequences_per_second") is not None:
        lines.append(f"  last run   {data['sequences_per_second']:.1f} sequences/s")
    latency = data.get("file_latency_seconds")
    if isinstance(latency, dict):
        lines.append(f"  latency    median {latency.get('median')} s, 90th percentile "
                     f"{latency.get('p90')} s from claim to done/ (last {latency.get('files')} "
                     "files)")
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
