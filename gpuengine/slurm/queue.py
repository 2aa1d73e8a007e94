"""The SLURM commands a cluster run uses — ``sbatch``, ``squeue``, ``sacct``, ``scancel`` — and
how their answers are read (torch-free).

What SLURM 22.05 does that this relies on (checked by tests/test_slurm_cluster.py, written up in
docs/slurm-testing.md): ``sbatch --parsable`` prints ``<id>`` or ``<id>;<cluster>``;
``squeue -r`` lists every array task of a live job as ``<array id>_<task>`` (pending ones too),
and skips ids it does not know; ``sacct -X`` lists finished tasks (a few seconds late) and
not-yet-started ones as ``<id>_[1-3,5%2]``, and fails where accounting is off. An array task
cancelled before it started leaves no record anywhere: only its missing done marker shows it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from gpuengine.errors import GpuEngineError

ACTIVE = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED",
                    "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "SIGNALING",
                    "STAGE_OUT"})
"""States of a job that has not ended (it may still run, or is running)."""
_TIMEOUT = 60
_BRACKETS = re.compile(r"^(\d+)_\[([^\]]*)\]$")


class SlurmError(GpuEngineError):
    """A SLURM command is missing or refused (``sbatch``'s own message is kept)."""


@dataclass(frozen=True)
class JobState:
    """A job or an array task (``"12"``, ``"12_3"``) as SLURM reports it."""

    job: str
    state: str
    reason: str = ""
    exit_code: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def _expand(job: str) -> list[str]:
    """``12_[1-3,5%2]`` → ``12_1 12_2 12_3 12_5``; anything else as it is."""
    match = _BRACKETS.match(job)
    if match is None:
        return [job]
    base, spec = match.group(1), match.group(2).split("%")[0]
    found = []
    for part in filter(None, spec.split(",")):
        low, _, high = part.partition("-")
        found.extend(f"{base}_{i}" for i in range(int(low), int(high or low) + 1))
    return found


class Slurm:
    """Runs the SLURM commands (on PATH, with the caller's environment: ``SLURM_CONF``...)."""

    def __init__(self, timeout: float = _TIMEOUT):
        self.timeout = timeout

    @staticmethod
    def available() -> bool:
        return shutil.which("sbatch") is not None and shutil.which("squeue") is not None

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise SlurmError(f"{cmd[0]} not found: gpuengine slurm needs the SLURM commands "
                             "(sbatch, squeue, scancel) on PATH; run it on a login node") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{' '.join(cmd)} did not answer within {self.timeout:.0f} s "
                             "(is slurmctld up?)") from None

    def sbatch(self, script: Path, *args: str) -> str:
        """Submit ``script`` with ``args`` before it; the new job's id."""
        proc = self._run("sbatch", "--parsable", *args, str(script))
        if proc.returncode != 0:
            message = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
            raise SlurmError(f"sbatch refused {script.name}: {message}")
        job = proc.stdout.strip().split(";")[0]
        if not job.isdigit():
            raise SlurmError(f"sbatch printed {proc.stdout.strip()!r}, not a job id")
        return job

    def cancel(self, *jobs: str) -> None:
        if jobs:
            self._run("scancel", *jobs)

    def states(self, jobs: list[str]) -> dict[str, JobState]:
        """Every job and array task of ``jobs`` that SLURM still knows: live ones from
        ``squeue`` (authoritative), finished ones from ``sacct`` (when accounting works)."""
        jobs = [j for j in jobs if j]
        if not jobs:
            return {}
        found = self._accounting(jobs)
        for job, live in self._queue(jobs).items():
            known = found.get(job)
            found[job] = JobState(job, live.state, live.reason, known.exit_code if known else "")
        return found

    def _queue(self, jobs: list[str]) -> dict[str, JobState]:
        if shutil.which("squeue") is None:
            return {}
        proc = self._run("squeue", "-h", "-r", "-t", "all", "-j", ",".join(jobs),
                         "-o", "%i|%T|%r")
        found = {}
        for line in proc.stdout.splitlines() if proc.returncode == 0 else ():
            parts = line.strip().split("|")
            if len(parts) == 3:
                for job in _expand(parts[0]):
                    found[job] = JobState(job, parts[1], parts[2])
        return found

    def _accounting(self, jobs: list[str]) -> dict[str, JobState]:
        if shutil.which("sacct") is None:
            return {}
        proc = self._run("sacct", "-n", "-P", "-X", "-j", ",".join(jobs),
                         "-o", "JobID,State,ExitCode,Reason")
        found = {}
        for line in proc.stdout.splitlines() if proc.returncode == 0 else ():
            parts = line.strip().split("|")
            if len(parts) == 4:
                state = parts[1].split()[0] if parts[1] else ""  # "CANCELLED by 0"
                for job in _expand(parts[0]):
                    found[job] = JobState(job, state, parts[3], parts[2])
        return found
