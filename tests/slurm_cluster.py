"""A real SLURM for the tests: the session fixture ``slurm`` and its ``SlurmCluster`` helper.

Owns finding a SLURM that answers — one already running (``SLURM_CONF``, the one-host cluster
of ``tools/slurm_local.sh``, or the system's), or that one-host cluster started on demand as root
with ``GPUENGINE_SLURM_AUTOSTART=1`` (and stopped again at the end of the session) — and, for the
tests, submitting sbatch scripts, reading job states, waiting for jobs to settle and cancelling.

Tests that take ``slurm`` skip only when no SLURM answers and none can be started, saying why;
with ``GPUENGINE_SLURM_REQUIRED=1`` (CI) that is a failure instead. ``docs/testing-slurm.md``
records how the one-host cluster behaves (states after scancel, afterok, $TMPDIR, fake GPUs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOCAL_SCRIPT = ROOT / "tools" / "slurm_local.sh"
LOCAL_DIR = Path(os.environ.get("GPUENGINE_SLURM_DIR", "/tmp/gpuengine-slurm"))

# Job states after which a job never runs again (squeue/scontrol/sacct spelling).
FINISHED = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
})
NEVER = "DependencyNeverSatisfied"  # reason of a job whose dependency can no longer be met
_FIELD = re.compile(r"(\w+)=(\S*)")


@dataclass(frozen=True)
class Job:
    """One job or array task as SLURM reports it. ``id`` is ``"12"`` for a plain job,
    ``"12_3"`` for array task 3 and ``"12_[4-7]"`` for array tasks not yet started."""

    id: str
    state: str  # COMPLETED, CANCELLED, FAILED, PENDING, RUNNING, ...
    reason: str = ""  # why it is pending: Dependency, DependencyNeverSatisfied, Resources, ...
    exit_code: str = ""  # "code:signal", e.g. "3:0" for exit 3, "0:15" for SIGTERM

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def never_runs(self) -> bool:
        """Pending on a dependency that can no longer be satisfied (SLURM keeps it pending)."""
        return self.state == "PENDING" and self.reason == NEVER

    @property
    def settled(self) -> bool:
        return self.finished or self.never_runs


class SlurmCluster:
    """Thin wrapper over the SLURM commands, with ``SLURM_CONF`` pinned to one cluster."""

    def __init__(self, conf: str | None, local_dir: Path | None = None):
        self.conf = conf  # None: the commands' default config
        self.local_dir = local_dir  # the one-host cluster's state dir, else None
        self.env = dict(os.environ)
        if conf:
            self.env["SLURM_CONF"] = conf

    def run(self, *cmd: str, input: str | None = None, cwd=None, check: bool = True,
            timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a SLURM command against this cluster; on failure raise with its stderr."""
        proc = subprocess.run(cmd, input=input, cwd=cwd, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def answers(self) -> str | None:
        """None when the controller answers with a partition, else what went wrong."""
        try:
            proc = self.run("sinfo", "-h", "-o", "%P %a", check=False, timeout=15)
        except subprocess.TimeoutExpired:
            return "sinfo timed out"
        if proc.returncode != 0 or not proc.stdout.strip():
            return (proc.stderr.strip().splitlines() or ["sinfo printed no partition"])[-1]
        return None

    def nodes(self) -> list[dict]:
        """[{name, state, cpus, gpus}] from sinfo (gpus: the node's gres/gpu count)."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N|%T|%c|%G").stdout
        result = []
        for line in sorted(set(out.split())):
            name, state, cpus, gres = line.split("|")
            gpus = re.search(r"gpu(?::[^:,(]+)?:(\d+)", gres)
            result.append({"name": name, "state": state, "cpus": int(cpus),
                           "gpus": int(gpus.group(1)) if gpus else 0})
        return result

    @property
    def gpus_per_node(self) -> int:
        """GPUs a job may request per node (0: leave --gres/--gpus* out of sbatch scripts)."""
        return min((n["gpus"] for n in self.nodes()), default=0)

    @property
    def has_sacct(self) -> bool:
        return self.run("sacct", "-n", "-X", "-j", "1", "-o", "JobID", check=False).returncode == 0

    def submit(self, script: str | os.PathLike, *sbatch_args: str, cwd=None) -> str:
        """sbatch a script file, or a script's text (given as a str starting with ``#!``);
        returns the job id."""
        text = isinstance(script, str) and script.startswith("#!")
        cmd = ["sbatch", "--parsable", *sbatch_args] + ([] if text else [str(script)])
        out = self.run(*cmd, input=script if text else None, cwd=cwd).stdout
        return out.strip().split(";")[0]

    def cancel(self, *job_ids: str, signal: str | None = None) -> None:
        self.run("scancel", *([f"--signal={signal}"] if signal else []), *job_ids)

    def jobs(self, *job_ids: str) -> dict[str, Job]:
        """The jobs and array tasks of ``job_ids`` (an array id covers all its tasks), from
        scontrol, or from sacct for jobs the controller has already forgotten. What neither
        knows is left out (an array task cancelled before it started has no record)."""
        found: dict[str, Job] = {}
        for job_id in job_ids:
            proc = self.run("scontrol", "-o", "show", "job", job_id, check=False)
            if proc.returncode != 0:
                found.update(self.accounting(job_id))
                continue
            for line in proc.stdout.splitlines():
                f = dict(_FIELD.findall(line))
                if "JobId" not in f:
                    continue
                task = f.get("ArrayTaskId", "")
                key = (f["ArrayJobId"] + (f"_{task}" if task.isdigit() else f"_[{task}]")
                       if task else f["JobId"])
                found[key] = Job(key, f.get("JobState", ""), f.get("Reason", ""),
                                 f.get("ExitCode", ""))
        return found

    def accounting(self, *job_ids: str) -> dict[str, Job]:
        """sacct's view of ``job_ids`` ({} without accounting); state "CANCELLED by 0" is
        reported as CANCELLED."""
        proc = self.run("sacct", "-n", "-P", "-X", "-j", ",".join(job_ids),
                        "-o", "JobID,State,Reason,ExitCode", check=False)
        found = {}
        for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
            job_id, state, reason, exit_code = line.split("|")
            found[job_id] = Job(job_id, state.split()[0] if state else "", reason, exit_code)
        return found

    def wait(self, *job_ids: str, timeout: float = 120, poll: float = 0.2) -> dict[str, Job]:
        """Poll until every job and task of ``job_ids`` has finished or can never run; return
        their states. On timeout raise with the states and the daemons' last log lines."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(*job_ids)
            if jobs and all(j.settled for j in jobs.values()):
                return jobs
            if time.monotonic() > deadline:
                states = sorted(jobs.values(), key=lambda j: j.id)
                raise TimeoutError(f"SLURM jobs {job_ids} not settled after {timeout}s: "
                                   f"{states}\n{self.log_tail()}")
            time.sleep(poll)

    def wait_until(self, predicate, timeout: float = 60, poll: float = 0.1,
                   what: str = "condition"):
        """Poll ``predicate()`` until it returns a true value; return that value."""
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not met after {timeout}s\n{self.log_tail()}")
            time.sleep(poll)
        return value

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the one-host cluster's slurmctld and slurmd logs (for errors)."""
        if self.local_dir is None:
            return ""
        parts = []
        for name in ("slurmctld", "slurmd"):
            path = self.local_dir / "log" / f"{name}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)


def _local_cluster() -> SlurmCluster:
    return SlurmCluster(str(LOCAL_DIR / "slurm.conf"), LOCAL_DIR)


def find_cluster() -> tuple[SlurmCluster | None, str]:
    """A SLURM that answers now (the one-host cluster first, then ``SLURM_CONF`` or the
    system's default config), or None and why not."""
    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        return None, "sbatch/sinfo not on PATH"
    candidates = []
    if (LOCAL_DIR / "slurm.conf").exists():
        candidates.append(_local_cluster())
    candidates.append(SlurmCluster(os.environ.get("SLURM_CONF")))
    problem = ""
    for cluster in candidates:
        problem = cluster.answers()
        if problem is None:
            return cluster, ""
    return None, f"no SLURM controller answers ({problem})"


def start_local() -> tuple[SlurmCluster | None, str]:
    """Start the one-host cluster with tools/slurm_local.sh (installs packages if missing)."""
    proc = subprocess.run(["bash", str(LOCAL_SCRIPT), "start"], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        return None, f"tools/slurm_local.sh start failed: {proc.stderr.strip()[-1500:]}"
    cluster = _local_cluster()
    problem = cluster.answers()
    if problem is not None:
        return None, f"started cluster does not answer: {problem}"
    return cluster, ""


@pytest.fixture(scope="session")
def slurm():
    """A SLURM cluster that answers (see the module docstring), with ``SLURM_CONF`` set for the
    session so that subprocesses (``gpuengine slurm ...``) reach the same cluster."""
    cluster, why = find_cluster()
    started = False
    if cluster is None:
        if os.environ.get("GPUENGINE_SLURM_AUTOSTART") == "1" and os.geteuid() == 0:
            cluster, why = start_local()
            started = cluster is not None
        else:
            why += ("; to start a one-host SLURM: as root, GPUENGINE_SLURM_AUTOSTART=1 or "
                    "tools/slurm_local.sh start")
    if cluster is None:
        if os.environ.get("GPUENGINE_SLURM_REQUIRED") == "1":
            pytest.fail(f"SLURM required (GPUENGINE_SLURM_REQUIRED=1) but unavailable: {why}")
        pytest.skip(f"no SLURM: {why}")
    try:
        with pytest.MonkeyPatch.context() as mp:
            if cluster.conf:
                mp.setenv("SLURM_CONF", cluster.conf)
            yield cluster
    finally:
        if started:
            subprocess.run(["bash", str(LOCAL_SCRIPT), "stop"], capture_output=True, timeout=120)
