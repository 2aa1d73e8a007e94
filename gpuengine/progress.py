"""Progress reporting interface. The engine calls a :class:`ProgressSink`; the CLI supplies a
rich implementation on stderr, library users get :class:`NullProgress` unless they pass one."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeviceProgress:
    name: str
    tokens_per_second: float
    """The device's tokens over the run's elapsed time (the devices' rates add up to the
    run's), as in the summary."""
    budget_tokens: int
    busy_fraction: float
    """The device's compute time over the run's elapsed time."""


@dataclass(frozen=True)
class ProgressSnapshot:
    committed_records: int
    """Record ids this run has committed (aliases included)."""
    total_records: int
    """Valid records of the input, whether stored before or not."""
    tokens_done: int
    elapsed: float
    """Seconds since embedding started."""
    devices: tuple[DeviceProgress, ...] = field(default_factory=tuple)
    stored_records: int = 0
    """Records found already in the table (an earlier or interrupted run); the planner finds
    them as it reads, usually well ahead of the devices."""
    failed_records: int = 0
    """Records given up (reported in the summary)."""

    @property
    def done_records(self) -> int:
        """Records with nothing left to do: stored before, committed now, or failed; equals
        ``total_records`` once a run completes."""
        return self.stored_records + self.committed_records + self.failed_records


class ProgressSink:
    """Base class: every method is a no-op."""

    def stage(self, message: str) -> None:
        """A one-line status message (loading the model, validating input, ...)."""

    def start(self, total_records: int, total_residues: int) -> None:
        """Embedding starts; totals are of the input's valid records (stored or not)."""

    def update(self, snapshot: ProgressSnapshot) -> None:
        """Called a few times per second, and once more after the last commit."""

    def close(self) -> None:
        """The run is over (successfully or not); no update follows."""


NullProgress = ProgressSink
