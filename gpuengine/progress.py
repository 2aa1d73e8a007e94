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
    total_records: int
    tokens_done: int
    elapsed: float
    devices: tuple[DeviceProgress, ...] = field(default_factory=tuple)


class ProgressSink:
    """Base class: every method is a no-op."""

    def stage(self, message: str) -> None:
        """A one-line status message (loading the model, validating input, ...)."""

    def start(self, total_records: int, total_residues: int) -> None:
        """Embedding starts; totals are of the records this run must commit."""

    def update(self, snapshot: ProgressSnapshot) -> None:
        """Called a few times per second with committed counts."""

    def close(self) -> None:
        """The run is over (successfully or not)."""


NullProgress = ProgressSink
