"""A process's children and whether a process is gone, read from /proc (for the tests that
kill an engine and check that its input processes did not outlive it)."""

from __future__ import annotations

import os
import time


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (no process, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_gone(pids: list[int], seconds: float = 30.0) -> bool:
    """Wait up to ``seconds`` for every one of ``pids`` to exit; whether they all did."""
    deadline = time.monotonic() + seconds
    while not all(map(gone, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(map(gone, pids))
