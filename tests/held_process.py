"""A ``gpuengine`` process held at a defined point, for tests that signal a real process once
its first commit is seen from outside (SIGINT, SIGTERM, SIGUSR1 through a SLURM task, SIGKILL).

Polling the store and then sending the signal races the run: a busy machine can let a small
run finish between the poll that sees the first commit and the signal (CI did, 580 records
with exit 0 where 130 was expected). A held process cannot finish first: started as

    python tests/held_process.py ARGS        (in place of ``python -m gpuengine ARGS``)

with ``HELD_RUN_BATCHES=B`` in its environment, each engine run in it hands its devices B
batches, then one more (the *held* batch), and nothing after that until the engine halts: on
the stop a signal requests, or on a failure (a killed writer). The B batches are finished and
committed by the engine's group timer as usual — the first commit the test waits for — while
the held batch stays in flight, so the signal always finds batches left and one in flight,
which the drain must finish and commit. A SIGKILL finds the process waiting.

The hold is per engine run (a daemon's tiny warm-up run is not held) and gives way when the
input is used up before it (a run of fewer than B + 2 batches cannot be held, and is not:
it completes, and the test fails on that, not on a hang). It waits at most
:data:`WAIT_SECONDS`; then the device fails with a message saying so (a test that forgot to
send its signal fails instead of hanging).

A ``gpuengine merge`` held the same way commits its first B chunks of vectors, one
transaction each, then waits for its stop (a signal) before the next, so a test that kills
it once vectors are merged finds it mid-merge (a merge of fewer than B + 1 chunks waits out
the bound and fails).

Without ``HELD_RUN_BATCHES`` the entry point is plain ``python -m gpuengine``. A ``gpuengine
slurm shard`` task run through it starts its child (the embedding run) through it too, so the
variable, inherited, holds that grandchild. A script run with ``python -c`` (a notebook-like
API caller) calls :func:`hold_if_asked` itself. Nothing here is read by the package.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from pathlib import Path

VARIABLE = "HELD_RUN_BATCHES"
"""The environment variable that turns the hold on: the batches handed out before the held one."""

BATCHES = 2
"""The batches a held run hands out before the held one (:func:`held_env`'s default)."""

WAIT_SECONDS = 60.0
"""The longest a held device waits for the engine's halt (a bound, not a pace: the test's
signal comes within a second or so of the first commit)."""

ENTRY = Path(__file__).resolve()


def held_env(env: dict[str, str], batches: int = BATCHES) -> dict[str, str]:
    """``env`` with the hold turned on (for a process started through :data:`ENTRY`)."""
    return {**env, VARIABLE: str(batches)}


def held_command(*args: str) -> list[str]:
    """``gpuengine ARGS`` through this entry point (held when the environment says so)."""
    return [sys.executable, str(ENTRY), *map(str, args)]


class _Hold:
    """One engine run's count of batches handed out, and which device holds the last one."""

    def __init__(self, batches: int):
        self.limit = batches + 1
        self.taken = 0
        self.holder: int | None = None
        self.lock = threading.Lock()


def _drained(scheduler) -> bool:
    """Nothing more to hand out, ever (the planner closed the input and all of it is taken)."""
    with scheduler._cv:
        return scheduler._closed_and_drained()


def _wait_for_halt(worker) -> None:
    """Block until the engine halts; return early if the input runs out meanwhile (the run
    was too small to hold: it may finish)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not worker.halt.wait(0.05):
        if _drained(worker.scheduler):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"a held run ({VARIABLE}) got no signal within "
                                 f"{WAIT_SECONDS:.0f} s of its hold: the test sent none")


def held_next_batch(real_next_batch, batches: int):
    """``DeviceWorker._next_batch`` held after ``batches`` batches of each engine run (see the
    module doc); ``real_next_batch`` is the one it wraps."""
    holds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    registry = threading.Lock()

    def next_batch(self, wait: bool):
        with registry:
            hold = holds.setdefault(self.scheduler, _Hold(batches))
        with hold.lock:
            full = hold.taken >= hold.limit
        if full and not _drained(self.scheduler):
            if not wait and hold.holder != self.index:
                return None  # another device: finish what is in flight, then wait below
            _wait_for_halt(self)  # the holder keeps its batch in flight meanwhile
        batch = real_next_batch(self, wait)  # None once the engine halted
        if batch is not None:
            with hold.lock:
                hold.taken += 1
                if hold.taken == hold.limit:
                    hold.holder = self.index
        return batch

    return next_batch


def install(batches: int) -> None:
    """Hold every engine run of this process after ``batches`` batches."""
    from gpuengine.worker import DeviceWorker

    DeviceWorker._next_batch = held_next_batch(DeviceWorker._next_batch, batches)


def held_write_chunk(real_write_chunk, chunks: int):
    """``_Merge._write_chunk`` that waits for the merge's stop after ``chunks`` chunks of
    vectors (see the module doc); ``real_write_chunk`` is the one it wraps."""
    written: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def write_chunk(self, table, kind, db, chunk, entry):
        real_write_chunk(self, table, kind, db, chunk, entry)
        if kind != "emb":
            return
        written[self] = written.get(self, 0) + 1
        if written[self] == chunks:
            if self.stop is None or not self.stop.wait(WAIT_SECONDS):
                raise AssertionError(f"a held merge ({VARIABLE}) got no signal within "
                                     f"{WAIT_SECONDS:.0f} s of its hold: the test sent none")

    return write_chunk


def install_merge_hold(chunks: int) -> None:
    """Hold every merge of this process after ``chunks`` chunks of vectors."""
    from gpuengine.store.merge import _Merge

    _Merge._write_chunk = held_write_chunk(_Merge._write_chunk, chunks)


def _start_children_through_here() -> None:
    """A SLURM task started here starts its ``gpuengine`` child here too."""
    from gpuengine.slurm import task

    task.GPUENGINE_COMMAND = (sys.executable, str(ENTRY))


def hold_if_asked() -> None:
    """Install the hold when :data:`VARIABLE` is set (a positive number of batches)."""
    value = os.environ.get(VARIABLE)
    if value:
        install(int(value))


def main() -> None:
    command = sys.argv[1:2]
    if command == ["slurm"]:  # a task runs no engine (and imports no torch) itself
        _start_children_through_here()
    elif command == ["merge"]:
        if os.environ.get(VARIABLE):
            install_merge_hold(int(os.environ[VARIABLE]))
    else:
        hold_if_asked()
    from gpuengine.cli import main as gpuengine_main

    sys.argv[0] = "gpuengine"
    gpuengine_main()


if __name__ == "__main__":
    sys.path[0] = str(ENTRY.parents[1])  # the repository, not tests/ (as ``-m gpuengine``)
    main()
