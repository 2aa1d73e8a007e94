"""Many small files, one run: files waiting in ``inbox/`` share batches (``--job embed``).

A sequencer or a pipeline drops thousands of small files; one run per file would leave the GPU
idle between them (hashing, validating, starting and draining a run). So the daemon claims up
to ``--group-files`` ready files at once (:func:`take_group`) and, after the usual per-file
steps (hash, job key, a finished job reused, attempts counted), runs **one** engine run over
all of them, in which each file is a part (:mod:`gpuengine.run_parts`):

1. every file is validated **on its own** against the store (:func:`validate_member`): a bad
   file goes to ``failed/`` alone and the others go on. A file sharing a record id with an
   earlier file of the group, or identical to one (the same job key), waits until the group
   is done and then runs alone (as it would have after it), so no id is in two parts;
2. one run over the files' valid records (:func:`combined_source`): their sequences share
   batches; identical sequences are computed once across files;
3. each file completes on its own: its job record is committed in the transaction of its
   last embedding, and once that is durable the file moves to ``done/``, while the run goes
   on with the others;
4. an error fails the run: files already done stay done; the others are retried one by one
   (after ``--retry-delay``), so one bad file cannot keep failing the rest. A device error
   exits as for one file. A stop request drains: the files not done stay in
   ``processing/``. At ``--precision fp8`` the fidelity guard measures the group's input
   together; when it refuses (before anything is written), each file runs alone and only a
   file refused on its own goes to ``failed/``.

Which files join a group: at most ``--group-files``, none larger than
:data:`GROUP_MAX_FILE_BYTES` (a large file has enough sequences to keep the GPU busy by
itself, and runs alone as before), at most :data:`GROUP_MAX_BYTES` together, and none whose
earlier attempts never finished :data:`SOLO_AFTER_ATTEMPTS` times or more (a file that
crashes the daemon ends up alone, so it cannot take the files grouped with it down too).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuengine.daemon.files import utc_now
from gpuengine.daemon.jobs import Claim
from gpuengine.daemon.status import _FileProgress
from gpuengine.errors import EXIT_ERROR, DeviceError, FidelityError, InputError, ModelLoadError

if TYPE_CHECKING:
    from gpuengine.daemon.service import Daemon

log = logging.getLogger("gpuengine.daemon")

GROUP_MAX_FILE_BYTES = 8 << 20
"""A larger file runs alone."""
GROUP_MAX_BYTES = 64 << 20
"""A group's files hold at most this much together (one file may be alone above it)."""
SOLO_AFTER_ATTEMPTS = 2
"""A file whose attempts never finished this many times runs alone."""
LISTED_PENDING = 50
"""Pending files a group's ``status.json`` entry names (the count is always there)."""


def groupable(path: Path, attempts: int) -> tuple[bool, int]:
    """(may ``path`` share a run, its size); a missing file is not."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return False, 0
    return size <= GROUP_MAX_FILE_BYTES and attempts < SOLO_AFTER_ATTEMPTS, size


def _size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def take_group(names: list[str], limit: int, size_of) -> list[str]:
    """The leading names of ``names`` that form one group (``size_of(name)``: (groupable,
    size)); a name that may not share a run is taken alone when it comes first."""
    group: list[str] = []
    total = 0
    for name in names:
        shareable, size = size_of(name)
        if group and (not shareable or len(group) >= limit or total + size > GROUP_MAX_BYTES):
            break
        group.append(name)
        total += size
        if not shareable or limit <= 1:
            break
    return group


# ----------------------------------------------------------------------------- input side


class _IdsSeen:
    """The store's conflict check during validation, noting every valid record's id."""

    def __init__(self, lookup: Any):
        self.lookup = lookup
        self.ids: set[str] = set()

    def conflict(self, record):
        self.ids.add(record.id)
        return self.lookup.conflict(record)


@dataclass
class GroupFile:
    """One validated file of a group."""

    claim: Claim
    source: Any
    """Its :class:`~gpuengine.inputs.RecordSource` (the valid records)."""
    ids: frozenset[str]


def validate_member(claim: Claim, alphabet, skip_invalid: bool, lookup) -> GroupFile:
    """Validate one file of a group on its own (InputError as for a file run alone)."""
    from gpuengine.fasta import stream_valid, validate
    from gpuengine.inputs import FastaInput, RecordSource

    path = claim.path
    seen = _IdsSeen(lookup)
    report = validate([path], alphabet=alphabet, skip_invalid=skip_invalid, stored=seen)
    source = RecordSource(lambda: stream_valid([path], report, alphabet=alphabet), report.valid,
                          report.residues, FastaInput((path,), report, alphabet))
    return GroupFile(claim, source, frozenset(seen.ids))


def combined_source(files: list[GroupFile]):
    """The group's input: each file's valid records, file after file (one FASTA input of
    several files, so a large group is read by the input process)."""
    from gpuengine.fasta import ValidationReport
    from gpuengine.inputs import FastaInput, RecordSource

    sources = [f.source for f in files]
    reports = [s.fasta.report for s in sources]
    report = ValidationReport(
        files=tuple(name for r in reports for name in r.files),
        records=sum(r.records for r in reports), valid=sum(r.valid for r in reports),
        duplicate_records=sum(r.duplicate_records for r in reports),
        problems=tuple(p for r in reports for p in r.problems),
        problem_count=sum(r.problem_count for r in reports),
        skip=frozenset(itertools.chain.from_iterable(r.skip for r in reports)),
        residues=sum(r.residues for r in reports))
    paths = tuple(p for s in sources for p in s.fasta.paths)
    return RecordSource(lambda: itertools.chain.from_iterable(s.iterate() for s in sources),
                        sum(s.count for s in sources), sum(s.residues for s in sources),
                        FastaInput(paths, report, sources[0].fasta.alphabet))


# ----------------------------------------------------------------------------- daemon side


class Finisher:
    """Moves the files of group runs to ``done/`` on a thread of its own.

    A file handed here has its job record durable in the store already; what is left (the
    job record beside it in done/, fsynced, then the rename, the status, the log line) is
    bookkeeping that should hold up neither the engine loop nor the next group: with
    thousands of small files, one fsync each on the loop thread would leave the GPU idle.
    The daemon drains it before it exits; a file it had not moved when the process died
    stays in processing/, and the next start finishes it from its job record, without a run.
    """

    def __init__(self, finish) -> None:
        self._finish = finish
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def put(self, claim: Claim, summary: Any, record: dict) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gpuengine-finisher",
                                            daemon=True)  # joined by drain()
            self._thread.start()
        self._queue.put((claim, summary, record))

    def drain(self) -> None:
        """Wait until every file handed in is moved (or its error logged)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            claim = item[0]
            try:
                self._finish(*item)
            except Exception as exc:  # it stays in processing/; the next start finishes it
                log.error("%s: its job is committed, but moving it to done/ failed (%s: %s); "
                          "it stays in processing/ and is moved at the next start", claim.name,
                          type(exc).__name__, exc)


class GroupRun:
    """One group of claimed files through the daemon's rules (see the module docstring)."""

    def __init__(self, daemon: Daemon, names: list[str]):
        self.daemon = daemon
        self.names = names
        self.started = time.perf_counter()
        self.claims: list[Claim] = []
        self.later: list[str] = []
        """Files that run alone after the group (same job as, or an id shared with, an
        earlier file of it)."""
        self.done: list[str] = []
        self.pending: dict[str, Claim] = {}
        """The files of the run not done yet."""
        self.since = utc_now()

    def process(self) -> None:
        d = self.daemon
        self._claims()
        if self.claims and not d.stop.is_set():
            files = self._validate()
            if files and not d.stop.is_set():
                self._run(files)
            elif files:  # a stop request while validating: not attempted after all
                d.attempts.undo_many([f.claim.name for f in files])
        for name in self.later:
            if d.stop.is_set():
                return  # they stay in processing/ for the next start
            d.process(name)

    def _claims(self) -> None:
        """Hash each file; settle the ones needing no run; count the others' attempts."""
        d, keys, todo = self.daemon, set(), []
        with d.jobs.reading():
            for name in self.names:
                if d.stop.is_set():
                    return  # the rest stay in processing/ for the next start
                unsettled = d._unsettled(name)
                if unsettled is None:
                    continue
                sha256, key = unsettled
                if key in keys:
                    self.later.append(name)
                    continue
                keys.add(key)
                todo.append((name, sha256, key))
        attempts = d.attempts.begin_many([(name, sha256) for name, sha256, _ in todo])
        self.claims = [Claim(name, d.processing / name, sha256, key, attempt, self.started,
                             _size(d.processing / name))
                       for (name, sha256, key), attempt in zip(todo, attempts)]

    def _validate(self) -> list[GroupFile]:
        d, files, seen = self.daemon, [], set()
        d.board.update(processing={
            "file": self.claims[0].name, "files": [c.name for c in self.claims[:LISTED_PENDING]],
            "group": {"files": len(self.claims), "done": 0, "pending": len(self.claims)},
            "attempt": max(c.attempt for c in self.claims), "since": self.since,
            "done_records": 0, "committed_records": 0, "total_records": None,
            "stage": "validating"})
        with d.job.validator() as validate_one:
            for index, claim in enumerate(self.claims):
                if d.stop.is_set():
                    d.attempts.undo_many([c.name for c in self.claims[index:]])
                    break
                try:
                    member = validate_one(claim)
                except InputError as exc:
                    d._fail(claim.name, exc, kind="input", attempts=claim.attempt,
                            sha256=claim.sha256)
                    continue
                if member.ids & seen:
                    d.attempts.undo(claim.name)
                    self.later.append(claim.name)
                    continue
                seen |= member.ids
                files.append(member)
        return files

    def _run(self, files: list[GroupFile]) -> None:
        d = self.daemon
        pending = self.pending = {f.claim.name: f.claim for f in files}
        self._show("starting")
        log.info("embedding %d files in one run (%d sequences)", len(files),
                 sum(f.source.count for f in files))
        summary = None
        try:
            summary = d.job.run_group(files, d.pool, _FileProgress(d.board), d.stop,
                                      self._finished)
        except (DeviceError, ModelLoadError) as exc:
            d.attempts.error_many(list(pending), exc)
            d._record_error(next(iter(pending), None), exc)
            log.error("a group of %d files: %s; exiting so that the service manager restarts "
                      "the daemon with fresh devices (%d files stay in processing/)",
                      len(files), exc, len(pending))
            from gpuengine.daemon.service import DaemonExit

            raise DaemonExit(EXIT_ERROR) from exc
        except FidelityError as exc:  # refused before anything was written: no attempt spent
            log.warning("a group of %d files: %s; each runs alone, judged on its own input",
                        len(files), exc)
            d.attempts.undo_many(list(pending))
            self.later.extend(pending)
        except KeyboardInterrupt:
            if not d.stop.is_set():
                raise
        except Exception as exc:
            log.error("a group of %d files failed (%s: %s); the %d not done are retried one "
                      "by one", len(files), type(exc).__name__, exc, len(pending))
            d._retry_or_fail_many(list(pending.values()), exc,
                                  clear_pool=not isinstance(exc, InputError))
        finally:
            d.board.update(processing=None)
            d.attempts.clear_many(self.done)
        if summary is not None and pending:
            if summary.interrupted:
                d.attempts.undo_many(list(pending))
                log.info("stopped on request: %d files of the group stay in processing/ and "
                         "are finished at the next start", len(pending))
            else:  # not announced (cannot happen): their records decide, alone
                self.later.extend(pending)

    def _finished(self, claim: Claim, summary: Any, record: dict) -> None:
        """A file's job record is durable: to done/ by the daemon's :class:`Finisher` (the
        run goes on with the others)."""
        self.pending.pop(claim.name, None)
        self.done.append(claim.name)
        self.daemon.finisher.put(claim, summary, record)
        self._show("embedding")

    def _show(self, stage: str) -> None:
        """The group in ``status.json``'s ``processing``: the files not done yet."""
        pending = list(self.pending)
        self.daemon.board.update_processing(
            files=pending[:LISTED_PENDING], file=pending[0] if pending else None,
            group={"files": len(self.claims), "done": len(self.done),
                   "pending": len(pending)}, stage=stage)
