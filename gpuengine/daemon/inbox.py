"""Watching the inbox by polling: which files are complete and may be claimed."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gpuengine.daemon.constants import MARKER_SUFFIX, TICK_NS
from gpuengine.daemon.files import is_ignored, looks_complete, marker_name

log = logging.getLogger("gpuengine.daemon")

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
    taken_as_is: bool = False
    """Taken at the end of the quiet period though it looks incomplete (logged once)."""


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
      newline, or whole gzip data. A stable but incomplete file waits (one warning); or
    * (last resort) unchanged for ``quiet_period`` seconds, whatever it looks like: a writer
      that paused that long is taken to be done. The file is then taken as it is (a valid
      FASTA without a final newline is embedded; junk goes to failed/ with the reason), so
      nothing waits in the inbox forever.
    """

    def __init__(self, inbox: Path, settle: float, quiet_period: float = 60.0, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_ns: Callable[[], int] = time.time_ns):
        self.inbox = Path(inbox)
        self.settle = settle
        self.quiet_period = max(quiet_period, settle)
        self._clock = clock
        self._wall_ns = wall_ns
        self._seen: dict[str, _Seen] = {}
        self._previous_poll_ns: int | None = None
        self.depth = 0
        """Files in the inbox at the last poll (ignored names excluded)."""
        self.waiting: list[str] = []
        """Files stable for ``settle`` seconds but not complete at the last poll (each is
        taken as it is once stable for ``quiet_period`` seconds)."""

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
        looks = "empty" if size == 0 else "not whole gzip data or no final newline"
        if now - seen.since >= self.quiet_period:
            if not seen.taken_as_is:
                seen.taken_as_is = True
                log.warning("inbox/%s has not changed for %g s (--quiet-period) though it looks "
                            "incomplete (%s): taking it as it is", name, self.quiet_period, looks)
            return "ready"
        if not seen.warned:
            seen.warned = True
            log.warning("inbox/%s has not changed for %g s but looks incomplete (%s); waiting "
                        "for more data, or taking it as it is once unchanged for %g s "
                        "(--quiet-period). To take it now, create inbox/%s", name, self.settle,
                        looks, self.quiet_period, marker_name(name))
        return "waiting"

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)
