"""What the daemon does with each claimed file: a :class:`Job` (``--job embed``:
:class:`~gpuengine.daemon.embed_job.EmbedJob`; ``--job predict``:
:class:`~gpuengine.daemon.predict_job.PredictJob`).

The daemon (:mod:`gpuengine.daemon.service`) owns everything that is the same for every kind of
job: the folders and the moves between them, the attempts, the retries and failures, the job
key, the job record in the store and beside the file in ``done/``, the status board. A job owns
what is its own: which models it loads at start-up and how it checks the store against them,
how it runs one file, what its job record says, and how its result is reported. A job never
moves files, counts attempts or touches the status board.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from gpuengine import __version__
from gpuengine.daemon.constants import WARMUP_PREFIX
from gpuengine.progress import ProgressSink


@dataclass(frozen=True)
class Claim:
    """One claimed file in ``processing/``, while it is being processed."""

    name: str
    path: Path
    """``processing/<name>``."""
    sha256: str
    key: str
    """The job key (``job-<hash>``): the file's content and the job's identity."""
    attempt: int
    """This attempt's number (1 for the first)."""
    started: float
    """``time.perf_counter()`` when processing began (hashing included)."""
    size: int | None = None
    """The file's size in bytes when known at the claim (a group's files: read then, not on
    the engine loop's thread when the job record is made)."""


@dataclass(frozen=True)
class Loaded:
    """What a job's start-up reports."""

    identity: dict[str, Any]
    """What makes two files of the same content the same job (part of the job key)."""
    board: dict[str, Any]
    """Fields of ``status.json`` (``model``, and ``devices`` where known)."""
    message: str
    """The log line, completed by the daemon with `` in N s``."""


@dataclass(frozen=True)
class Report:
    """What a finished file reports, besides its job record."""

    last_run: dict[str, Any]
    """``status.json``'s ``last_run`` after ``file`` and ``seconds``."""
    message: str
    """The log line after ``NAME -> done/TARGET: ``."""
    board: dict[str, Any] = field(default_factory=dict)
    """Other fields of ``status.json`` (``devices``)."""


class Job(ABC):
    """One kind of work done on every claimed file, with models loaded once per process."""

    commits_record: bool = False
    """True when :meth:`run` commits the job record in the transaction of the file's last
    embeddings (a crash after it never runs the file again); otherwise the daemon stores it
    after the run."""
    groups: bool = False
    """True when small files may share one run (``validator`` and ``run_group``:
    :mod:`gpuengine.daemon.groups`)."""

    @abstractmethod
    def load(self, pool: Any, progress: ProgressSink,
             stop: threading.Event) -> Loaded | None:
        """Load the models on every device into ``pool`` (the replicas every run reuses), by
        running a tiny built-in input into a throw-away store, before any file is claimed.
        Model and option errors raise here. None: a stop request interrupted it."""

    @abstractmethod
    def check_store(self) -> None:
        """Refuse to start on a store whose tables mean something else than what
        :meth:`load` built (compute precision included), rather than failing every file."""

    @abstractmethod
    def run(self, claim: Claim, pool: Any, progress: ProgressSink,
            stop: threading.Event) -> Any:
        """Process one claimed file; returns its summary (``summary.interrupted`` is True when a
        stop request ended it early). Input errors raise
        :class:`~gpuengine.errors.InputError`."""

    @abstractmethod
    def record(self, claim: Claim, summary: Any, seconds: float) -> dict[str, Any]:
        """The job record of a finished file (``status`` and ``counts`` at least): the run
        record ``job-<key>`` in the store and ``done/NAME.job.json``."""

    @abstractmethod
    def report(self, summary: Any, record: dict[str, Any], seconds: float) -> Report:
        """How a finished file shows in ``status.json`` and in the log."""


def versions() -> dict[str, str]:
    """The versions a job record names (of the modules this process has loaded)."""
    import platform

    found = {"gpuengine": __version__, "python": platform.python_version()}
    for module in ("torch", "lmdb", "numpy"):
        mod = sys.modules.get(module)
        if mod is not None:
            found[module] = getattr(mod, "__version__", "?")
    return found


@contextlib.contextmanager
def throwaway_dir(directory: Path) -> Iterator[Path]:
    """A warm-up's scratch folder in the watched directory (removed after, and at the next
    start if the process dies meanwhile)."""
    tmp = Path(tempfile.mkdtemp(prefix=WARMUP_PREFIX, dir=directory))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_tables(store: Path, specs: list) -> None:
    """Each table spec must match the store's table of that name (or it is new)."""
    from gpuengine.store.writer import StoreWriter

    with StoreWriter(store) as writer:
        for spec in specs:
            writer.check_table(spec)
