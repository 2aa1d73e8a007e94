"""The daemon itself: start-up, the loop, claiming files, and the rules every file follows
(attempts, retries, failures, the job record, the move to ``done/``). What is done *to* a file
(embed it, or predict it) is its :class:`~gpuengine.daemon.jobs.Job`."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gpuengine import systemd
from gpuengine.config import EmbedConfig
from gpuengine.errors import (EXIT_ERROR, EXIT_OK, DeviceError, FidelityError,
                              GpuEngineError, InputError, ModelLoadError, UsageError)
from gpuengine.daemon.constants import ATTEMPTS_FILE, ERROR_SUFFIX, FOLDERS, JOB_PREFIX, JOB_SUFFIX, LOCK_FILE, WARMUP_PREFIX
from gpuengine.daemon.files import atomic_write_json, error_record, file_sha256, free_name, is_ignored, marker_name, utc_now
from gpuengine.daemon.embed_job import EmbedJob, RunFunction
from gpuengine.daemon.events import Waker
from gpuengine.daemon.groups import GROUP_MAX_BYTES, Finisher, GroupRun, groupable, take_group
from gpuengine.daemon.inbox import InboxWatcher
from gpuengine.daemon.books import AttemptBook, JobBook
from gpuengine.daemon.jobs import Claim, Job, versions
from gpuengine.daemon.predict_job import PredictJob
from gpuengine.daemon.status import StatusBoard, _FileProgress

log = logging.getLogger("gpuengine.daemon")

# ----------------------------------------------------------------------------- the daemon


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``gpuengine serve`` needs. ``embed`` is the template of every run: its
    ``inputs`` are replaced by the claimed file (build it with any placeholder input)."""

    watch: Path
    embed: EmbedConfig
    poll_interval: float = 2.0
    """Seconds between polls of the inbox."""
    force_poll: bool = False
    """Never use inotify (it is also off by itself on network filesystems)."""
    settle: float = 5.0
    """The fallback: seconds a file must stay unchanged (and look complete) to be taken."""
    quiet_period: float = 60.0
    """The last resort: seconds after which a file that stayed unchanged is taken as it is,
    complete-looking or not (so nothing waits in inbox/ forever); at least ``settle``."""
    max_attempts: int = 3
    """Attempts per file before it goes to failed/ (input errors fail at once)."""
    status_interval: float = 5.0
    """Seconds between status.json heartbeats; ``gpuengine status`` calls 3x this stale."""
    retry_delay: float = 10.0
    """Seconds before the first retry of a file after an error; doubles each attempt, 10 min
    at most."""
    predict: Any = None
    """``--job predict``: a :class:`~gpuengine.workflows.virnucpro.pipeline.PredictConfig`
    template (its reads, out and store are set per file); None: ``--job embed``. Read once,
    by :func:`job_for`."""
    group_files: int = 1024
    """``--group-files``: up to this many small files waiting in inbox/ share one run
    (``--job embed``; :mod:`gpuengine.daemon.groups`); 1: one run per file."""

    def __post_init__(self) -> None:
        _check_seconds("--poll-interval", self.poll_interval)
        _check_seconds("--settle", self.settle, zero_ok=True)
        if not self.quiet_period >= self.settle:  # also refuses NaN
            raise UsageError(f"--quiet-period must be at least --settle ({self.settle} s; "
                             f"got {self.quiet_period})")
        if self.max_attempts < 1:
            raise UsageError(f"--max-attempts must be at least 1 (got {self.max_attempts})")
        _check_seconds("--status-interval", self.status_interval)
        _check_seconds("--retry-delay", self.retry_delay, zero_ok=True)
        if self.group_files < 1:
            raise UsageError(f"--group-files must be at least 1 (got {self.group_files})")


def _check_seconds(option: str, value: float, *, zero_ok: bool = False) -> None:
    """Refuse ``option`` unless ``value`` is a finite number of seconds above 0 (at least 0
    with ``zero_ok``). ``not 0 < x`` rather than ``x <= 0``: NaN compares false both ways,
    and must fail."""
    if not ((0 <= value) if zero_ok else (0 < value)) or not value < math.inf:
        kind = "non-negative" if zero_ok else "positive"
        raise UsageError(f"{option} must be a {kind} number of seconds (got {value})")


class DaemonExit(Exception):
    """Leave the daemon with ``code`` (after writing the final status)."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message)
        self.code = code


def job_for(config: ServeConfig, run: RunFunction | None = None) -> Job:
    """The job ``--job`` asked for: predict when ``config.predict`` is set, else embed
    (``run`` stands in for :func:`gpuengine.engine.run_embed`)."""
    if config.predict is not None:
        return PredictJob(config.predict, Path(config.watch), config.embed.out)
    return EmbedJob(config.embed, Path(config.watch), run)


class Daemon:
    """Serves one watched directory until stopped; each claimed file goes through
    :meth:`process` (see the package docstring for the rules)."""

    def __init__(self, config: ServeConfig, *, stop: threading.Event | None = None,
                 run: RunFunction | None = None,
                 notify: Callable[[str], Any] | None = None):
        self.config = config
        self.dir = Path(config.watch)
        self.inbox, self.processing, self.done, self.failed = (self.dir / f for f in FOLDERS)
        self.stop = stop or threading.Event()
        self.job = job_for(config, run)
        if notify is None:
            socket_path = config.embed.env.notify_socket
            notify = lambda message: systemd.notify(message, socket_path)  # noqa: E731
        self._notify = notify
        self.pool = None
        self.identity: dict[str, Any] = {}
        """The job's identity (from its start-up): with a file's sha256, its job key."""
        self.attempts = AttemptBook(self.dir / ATTEMPTS_FILE)
        self.jobs = JobBook(config.embed.out)
        self.board = StatusBoard(self.dir, config.status_interval, notify,
                                 memories=lambda: self.pool.memories() if self.pool else [])
        self.board.update(store=str(config.embed.out), model=config.embed.model)
        self.watcher = InboxWatcher(self.inbox, config.settle, config.quiet_period)
        self.waker: Waker | None = None
        self.retry_at: dict[str, float] = {}
        self._lock_fd: int | None = None
        self._busy: set[str] = set()
        self.finisher = Finisher(functools.partial(self._finish_with_record,
                                                   clear_attempts=False))
        """Moves the files of group runs to done/ (:class:`~gpuengine.daemon.groups.Finisher`)."""

    # -- whole life ----------------------------------------------------------------------

    def run(self) -> int:
        """Start, serve until stopped, return the exit code (0 after a clean stop)."""
        code = EXIT_OK
        try:
            self.prepare()
            self.waker = Waker(self.inbox, force_poll=self.config.force_poll)
            self.board.update(watch=self.waker.mode)
            self.board.start()
            self.warm_up()
            self.job.check_store()
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
            self.finisher.drain()
            if self.waker is not None:
                self.waker.close()
            if self._lock_fd is not None:  # never overwrite the status of another daemon
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
            if self._lock_fd is not None:
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
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock()
            for folder in (self.inbox, self.processing, self.done, self.failed):
                folder.mkdir(exist_ok=True)
        except OSError as exc:  # --watch is a file, or not writable
            raise GpuEngineError(f"cannot watch {self.dir}: {exc.strerror or exc} (--watch "
                                 "must be a directory gpuengine can write to)") from None
        devices = {os.stat(f).st_dev for f in (self.inbox, self.processing, self.done,
                                                self.failed)}
        if len(devices) > 1:
            raise GpuEngineError(f"{self.dir}: inbox/, processing/, done/ and failed/ must be "
                                 "on one filesystem (files move between them by rename)")
        for leftover in self.dir.glob(WARMUP_PREFIX + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for folder in (self.dir, self.done, self.failed):  # a write cut short by a kill
            for leftover in folder.glob(".*.tmp"):
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

    def warm_up(self) -> None:
        """Load the job's models on every device into the replica pool every run reuses."""
        from gpuengine.replicas import ReplicaPool

        self.pool = ReplicaPool()
        started = time.perf_counter()
        loaded = self.job.load(self.pool, _FileProgress(self.board, loading=True), self.stop)
        if loaded is None:  # a stop request during the load
            raise DaemonExit(EXIT_OK)
        self.identity = loaded.identity
        self.board.update(**loaded.board)
        log.info("%s in %.1f s", loaded.message, time.perf_counter() - started)

    def recover(self) -> None:
        """Finish every file a previous daemon left in ``processing/`` (in groups, as new
        files are)."""
        names = sorted(n for n in os.listdir(self.processing) if not is_ignored(n))
        if names:
            log.info("recovering %d file(s) left in processing/", len(names))
        for name in names:
            (self.inbox / marker_name(name)).unlink(missing_ok=True)
        while names and not self.stop.is_set():
            group = take_group(names, self._group_limit(), self._shareable)
            names = names[len(group):]
            self.process_many(group)
        self.finisher.drain()

    # -- the loop ------------------------------------------------------------------------

    def loop(self) -> None:
        if self.waker is None:
            self.waker = Waker(self.inbox, force_poll=self.config.force_poll)
        while not self.stop.is_set():
            now = time.monotonic()
            due = sorted((t, n) for n, t in self.retry_at.items() if t <= now)
            if due:
                self.process(due[0][1])
                continue
            ready = self.watcher.poll()
            self.board.update(queue=self.watcher.depth, waiting=self.watcher.waiting,
                              retrying=sorted(self.retry_at))
            claimed = self.claim_group(ready)
            if claimed:
                self.process_many(claimed)  # then poll again: retries and fresher state first
            else:
                self.waker.wait(self.config.poll_interval, self.stop)
        self.finisher.drain()

    def _group_limit(self) -> int:
        return self.config.group_files if getattr(self.job, "groups", False) else 1

    def _shareable(self, name: str) -> tuple[bool, int]:
        """(may ``processing/name`` share a run, its size)."""
        return groupable(self.processing / name, self.attempts.get(name).get("attempts", 0))

    def claim_group(self, ready: list[str]) -> list[str]:
        """Claim the ready files that form the next group (one file when it may not share
        a run, or with ``--group-files 1``); [] when none could be claimed."""
        limit, claimed, total = self._group_limit(), [], 0
        for name in ready:
            if self.stop.is_set() or len(claimed) >= limit:
                break
            shareable, size = groupable(self.inbox / name, self.attempts.get(name).get(
                "attempts", 0))
            if claimed and (not shareable or total + size > GROUP_MAX_BYTES):
                break
            if self.claim(name):
                claimed.append(name)
                total += size
                if not shareable:
                    break
        return claimed

    def process_many(self, names: list[str]) -> None:
        """One file as before; several in one run (:class:`~gpuengine.daemon.groups.GroupRun`)."""
        if len(names) == 1:
            self.process(names[0])
        elif names:
            GroupRun(self, names).process()

    def claim(self, name: str) -> bool:
        """``os.replace(inbox/x, processing/x)``; False if it is gone or the name is busy."""
        if (self.processing / name).exists():
            if name not in self._busy:
                self._busy.add(name)
                log.warning("inbox/%s waits: a file of that name is still in processing/", name)
            return False
        self._busy.discard(name)
        self.watcher.forget(name)
        try:
            os.replace(self.inbox / name, self.processing / name)
        except FileNotFoundError:
            return False
        (self.inbox / marker_name(name)).unlink(missing_ok=True)
        self.watcher.depth = max(0, self.watcher.depth - 1)
        self.board.update(queue=self.watcher.depth)
        log.info("claimed %s", name)
        return True

    # -- one file ------------------------------------------------------------------------

    def job_key(self, sha256: str) -> str:
        text = json.dumps({"sha256": sha256, **self.identity}, sort_keys=True, default=str)
        return JOB_PREFIX + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    def process(self, name: str) -> None:
        """Run the job on ``processing/name`` and move it to done/ or failed/ (or leave it
        there for a retry or after a stop request)."""
        started = time.perf_counter()
        unsettled = self._unsettled(name)
        if unsettled is None:
            return
        sha256, key = unsettled
        if self.stop.is_set():
            return  # a stop request: leave it in processing/ for the next start
        attempt = self.attempts.begin(name, sha256)
        claim = Claim(name, self.processing / name, sha256, key, attempt, started)
        summary = self._run(claim)
        if summary is None:
            return
        try:
            self._finish(claim, summary)
        except Exception as exc:
            self._retry_or_fail(name, exc, attempt, sha256)

    def _unsettled(self, name: str) -> tuple[str, str] | None:
        """The sha256 and job key of ``processing/name`` when it still needs a run; None when
        it needs none (gone, unreadable and failed, settled without running, or a stop request
        came while hashing). Drops a retry scheduled for it (it is being processed now)."""
        self.retry_at.pop(name, None)
        sha256 = self._hash(name)
        if sha256 is None:
            return None
        key = self.job_key(sha256)
        if self._settled_without_run(name, sha256, key):
            return None
        return sha256, key

    def _hash(self, name: str) -> str | None:
        """The file's sha256; None when there is nothing to process (it is gone, unreadable
        and failed, or a stop request came while hashing)."""
        try:
            return file_sha256(self.processing / name, self.stop)
        except FileNotFoundError:
            self.attempts.clear(name)
        except OSError as exc:  # unreadable (permissions, I/O error): a problem of the file
            self._fail(name, InputError(f"{name}: cannot read it: {exc}"), kind="input",
                       attempts=self.attempts.get(name).get("attempts", 0), sha256=None)
        return None

    def _settled_without_run(self, name: str, sha256: str, key: str) -> bool:
        """True when the file is settled without running: its job is already finished in the
        store (done/), or earlier attempts never finished too often (failed/)."""
        previous = self.jobs.get(key)
        if previous is not None and previous.get("status") in ("complete", "partial"):
            self._finish_reused(name, sha256, key, previous)
            return True
        book = self.attempts.get(name)
        if book.get("sha256") == sha256 and book.get("attempts", 0) >= self.config.max_attempts:
            errors = book.get("errors", [])
            last = errors[-1]["message"] if errors else "no error was recorded"
            exc = GpuEngineError(f"gave up after {book['attempts']} attempts that did not "
                                 f"finish (the daemon stopped or died during each); last "
                                 f"error: {last}")
            log.error("%s -> failed/: %s", name, exc)
            self._fail(name, exc, kind="error", attempts=book["attempts"], sha256=sha256,
                       errors=errors)
            return True
        return False

    def _run(self, claim: Claim) -> Any:
        """Run the job on the claimed file; its summary, or None when the file was handled
        here (failed, set for a retry, or left in processing/ after a stop request)."""
        name = claim.name
        self.board.update(processing={"file": name, "attempt": claim.attempt,
                                      "since": utc_now(), "done_records": 0,
                                      "committed_records": 0, "total_records": None,
                                      "stage": "starting"})
        try:
            summary = self.job.run(claim, self.pool, _FileProgress(self.board), self.stop)
        except InputError as exc:
            self._fail(name, exc, kind="input", attempts=claim.attempt, sha256=claim.sha256)
            return None
        except FidelityError as exc:  # this file's content at --precision fp8: no retry helps
            self._fail(name, exc, kind="fidelity", attempts=claim.attempt, sha256=claim.sha256)
            return None
        except KeyboardInterrupt:  # the engine's answer to a stop request during validation
            if not self.stop.is_set():
                raise
            self.attempts.undo(name)
            log.info("%s: stopped on request before embedding; it stays in processing/", name)
            return None
        except (DeviceError, ModelLoadError) as exc:
            self.attempts.error(name, exc)
            self._record_error(name, exc)
            log.error("%s: %s; exiting so that the service manager restarts the daemon with "
                      "fresh devices (the file stays in processing/, attempt %d of %d)",
                      name, exc, claim.attempt, self.config.max_attempts)
            raise DaemonExit(EXIT_ERROR) from exc
        except Exception as exc:
            self._retry_or_fail(name, exc, claim.attempt, claim.sha256)
            return None
        finally:
            self.board.update(processing=None)
        if summary.interrupted:
            self.attempts.undo(name)
            log.info("%s: stopped on request; it stays in processing/ and is finished at the "
                     "next start (nothing committed is computed again)", name)
            return None
        return summary

    def _record_error(self, name: str, exc: BaseException) -> None:
        self.board.update(last_error={"at": utc_now(), "file": name,
                                      "message": f"{type(exc).__name__}: {exc}"[:4000]})

    def _retry_or_fail(self, name: str, exc: Exception, attempt: int, sha256: str, *,
                       clear_pool: bool = True, noted: bool = False) -> None:
        if not noted:
            self.attempts.error(name, exc)
            self._record_error(name, exc)
        if self.pool is not None and clear_pool:
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

    def _retry_or_fail_many(self, claims: list[Claim], exc: Exception, *,
                            clear_pool: bool = True) -> None:
        """:meth:`_retry_or_fail` for the files of a failed group (the error noted once)."""
        self.attempts.error_many([c.name for c in claims], exc)
        if claims:
            self._record_error(claims[0].name, exc)
        if self.pool is not None and clear_pool:
            self.pool.clear()
        for claim in claims:
            self._retry_or_fail(claim.name, exc, claim.attempt, claim.sha256, clear_pool=False,
                                noted=True)

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
        if kind in ("input", "fidelity"):
            log.error("%s -> failed/%s: %s", name, target, exc)

    def _finish(self, claim: Claim, summary: Any) -> None:
        """The run is over: the job record in the store (unless the run committed it with
        the last embeddings), then beside the file in done/, then the move."""
        seconds = time.perf_counter() - claim.started
        stored = self.jobs.get(claim.key) if self.job.commits_record else None
        if stored is None:  # not committed by the run (or a run function that does not)
            record = self.job.record(claim, summary, seconds)
            self.jobs.put(claim.key, record)
        else:
            record = stored["info"]
        self._finish_with_record(claim, summary, record)

    def _finish_with_record(self, claim: Claim, summary: Any, record: dict[str, Any], *,
                            clear_attempts: bool = True) -> None:
        """The file's job record is in the store: beside the file in done/, the move, the
        status and the log."""
        seconds = time.perf_counter() - claim.started
        target = self._move_to_done(claim.name, record, clear_attempts=clear_attempts)
        report = self.job.report(summary, record, seconds)
        self.board.update(last_file={"file": claim.name, "result": record["status"],
                                     "at": utc_now()},
                          last_run={"file": claim.name, "seconds": round(seconds, 3),
                                    **report.last_run},
                          sequences_per_second=record["sequences_per_second"], **report.board)
        self.board.file_latency(seconds)
        log.info("%s -> done/%s: %s", claim.name, target, report.message)

    def _move_to_done(self, name: str, record: dict[str, Any], *,
                      clear_attempts: bool = True) -> str:
        """The job record beside the file's place in done/ (``done_as`` added), then the move
        out of processing/; returns the name the file got there."""
        target = free_name(self.done, name)
        record["done_as"] = f"done/{target}"
        atomic_write_json(self.done / (target + JOB_SUFFIX), record)
        os.replace(self.processing / name, self.done / target)
        if clear_attempts:
            self.attempts.clear(name)
        self.board.add("files_done")
        return target

    def _finish_reused(self, name: str, sha256: str, key: str, previous: dict) -> None:
        """The job is finished in the store: this file's own job (a restart after the job
        record was committed), or an identical earlier file's (a duplicate)."""
        first = previous.get("info", {})
        if first.get("file") == name and first.get("sha256") == sha256:
            record = {**first, "recovered_at": utc_now()}
            how = "its job record was already in the store"
        else:
            record = {"job": key, "file": name, "sha256": sha256, "status": previous["status"],
                      "reused": True, "note": "a job with identical content and options is "
                      "already finished in the store: nothing was recomputed",
                      "first_file": first.get("file"),
                      "first_finished_at": first.get("finished_at"),
                      "counts": first.get("counts"), "failed_count": first.get("failed_count"),
                      "finished_at": utc_now(), "versions": versions()}
            how = f"identical to the finished job of {first.get('file')}; nothing to compute"
        target = self._move_to_done(name, record)
        self.board.update(last_file={"file": name, "result": "reused" if record.get("reused")
                                     else record.get("status"), "at": utc_now()})
        log.info("%s -> done/%s: %s", name, target, how)


# ----------------------------------------------------------------------------- entry point


def serve(config: ServeConfig, *, verbose: int = 0, quiet: bool = False) -> int:
    """``gpuengine serve``: run the daemon in this (main) thread; returns the exit code.
    SIGTERM/SIGINT drain (:meth:`Daemon.request_stop`); a second one exits at once (130)."""
    from gpuengine.display import setup_logging
    from gpuengine.signals import StopOnSignals

    setup_logging(verbose, quiet, plain=True)
    daemon = Daemon(config)
    with StopOnSignals(daemon.stop, daemon.request_stop, keep_after_stop=True):
        return daemon.run()
