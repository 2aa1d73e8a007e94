"""Submitting a cluster run, and submitting it again (torch-free).

A submission writes OUT/slurm/job.json (the manifest) the first time, the two sbatch scripts
every time, and submits:

* the array, with ``--array=`` the shards that have **no done marker** (all of them the first
  time; after a preemption, a failed node or a cancelled task, only those);
* the merge job, ``--dependency=afterok:<array>`` (no dependency when every shard is done
  but the merge is not).

Before that it refuses to run a shard twice at once (a shard without a marker whose task is
still pending or running: wait, or scancel it) and cancels a merge job of an earlier
submission that is still pending (it waits on tasks that failed or were cancelled — SLURM
keeps such a job pending for ever unless it cancels it itself — or on nothing that will still
come); the new merge job replaces it. A merge job that is running is left alone and nothing is
submitted. A resubmission must give the same command, arguments, ``--shards`` and
``--no-merge`` (or its absence) as the manifest (the shards already done depend on them, and
status reads the run by them); the sbatch options may change.

With ``--no-merge`` (``Manifest.merge`` False; embed only) no merge script is written and only
the array is submitted: OUT/shards is the result, read as one store or merged later with
``gpuengine merge``; the run is complete when every shard has its marker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gpuengine.errors import UsageError
from gpuengine.slurm.layout import Manifest, RunLayout
from gpuengine.slurm.queue import Slurm, SlurmError
from gpuengine.slurm.scripts import SbatchOptions, array_script, merge_script
from gpuengine.vocabulary import utc_now


@dataclass
class Submission:
    """What a submission did (or, with ``dry_run``, would do)."""

    out: str
    command: str
    shards: int
    missing: list[int]
    """Shards without a done marker (submitted in the array)."""
    array_script: str
    merge_script: str
    array_job: str | None = None
    merge_job: str | None = None
    cancelled: list[str] = field(default_factory=list)
    """Stale pending merge jobs of earlier submissions, cancelled."""
    sbatch: list[list[str]] = field(default_factory=list)
    """The sbatch command lines (run, or to run)."""
    dry_run: bool = False
    complete: bool = False
    """Everything was done and merged already (with ``--no-merge``: every shard done):
    nothing submitted."""
    merge: bool = True
    """False: ``--no-merge``, no merge job (``merge_script`` is empty)."""

    def to_json(self) -> dict:
        return dict(self.__dict__)


def index_ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``"0-2,5,7-8"`` (an ``--array=`` value)."""
    parts: list[str] = []
    for i in sorted(indices):
        if parts and parts[-1][1] == i - 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in parts)


def _check_manifest(layout: RunLayout, manifest: Manifest) -> bool:
    """True when OUT already holds this run's manifest; UsageError when it holds another."""
    if not layout.manifest_path.exists():
        return False
    old = layout.read_manifest()
    differences = old.differences(manifest)
    if differences:
        raise UsageError(
            f"{layout.out} holds a run submitted with other arguments ({'; '.join(differences)});"
            " its shards depend on them: submit the same command to resume it, or use another "
            "--out for a new run")
    return True


def _earlier_jobs(layout: RunLayout) -> tuple[list[str], list[str]]:
    arrays, merges = [], []
    for entry in layout.submissions():
        if entry.get("array_job"):
            arrays.append(str(entry["array_job"]))
        if entry.get("merge_job"):
            merges.append(str(entry["merge_job"]))
    return arrays, merges


def _live(layout: RunLayout, slurm: Slurm, missing: list[int]) -> tuple[dict[int, str], list[str],
                                                                          list[str]]:
    """({shard: live task} for shards without a marker, pending merge jobs, running ones)."""
    arrays, merges = _earlier_jobs(layout)
    states = slurm.states(arrays + merges)
    busy: dict[int, str] = {}
    for array in arrays:
        for i in missing:
            state = states.get(f"{array}_{i}")
            if state is not None and state.active:
                busy[i] = f"{array}_{i} {state.state}"
    pending = [m for m in merges if m in states and states[m].state == "PENDING"]
    running = [m for m in merges if m in states and states[m].active and m not in pending]
    return busy, pending, running


def submit(manifest: Manifest, options: SbatchOptions, *, dry_run: bool = False,
           slurm: Slurm | None = None) -> Submission:
    """Write the scripts and submit what is missing (see the module docstring)."""
    layout = RunLayout(Path(manifest.out), manifest.command)
    known = _check_manifest(layout, manifest)
    slurm = slurm or Slurm()
    if not dry_run and not slurm.available():
        raise SlurmError("sbatch/squeue not found: gpuengine slurm needs the SLURM commands on "
                         "PATH (run it on the cluster's login node), or --dry-run to only "
                         "write the scripts")
    n = manifest.shards
    missing = sorted(set(range(n)) - layout.done(n))
    layout.logs_dir.mkdir(parents=True, exist_ok=True)
    layout.shards_dir.mkdir(parents=True, exist_ok=True)
    layout.array_script.write_text(array_script(manifest, layout, options))
    if manifest.merge:
        layout.merge_script.write_text(merge_script(manifest, layout, options))
    result = Submission(str(layout.out), manifest.command, n, missing, str(layout.array_script),
                        str(layout.merge_script) if manifest.merge else "", dry_run=dry_run,
                        merge=manifest.merge)
    array_cmd = ["sbatch", "--parsable", f"--array={index_ranges(missing)}",
                 str(layout.array_script)]
    merge_cmd = ["sbatch", "--parsable", "--dependency=afterok:<array job>",
                 str(layout.merge_script)]
    if not missing:
        merge_cmd.remove("--dependency=afterok:<array job>")
    if not missing and (layout.merged_marker.exists() or not manifest.merge):
        result.complete = True
        return result
    merge_cmds = [merge_cmd] if manifest.merge else []
    result.sbatch = ([array_cmd] if missing else []) + merge_cmds
    if dry_run:
        return result
    busy, pending, running = _live(layout, slurm, missing)
    if busy:
        raise UsageError(
            f"{len(busy)} shards without a done marker are still queued or running "
            f"({', '.join(busy[i] for i in sorted(busy)[:10])}); submitting them again would run "
            f"them twice: wait for them (gpuengine slurm status {layout.out}), or scancel them "
            "and submit again")
    if running:
        raise UsageError(f"the merge job {', '.join(running)} of {layout.out} is running; "
                         "nothing to submit (gpuengine slurm status shows how it ends)")
    if pending:
        slurm.cancel(*pending)
        result.cancelled = pending
    if not known:
        layout.manifest_path.write_text(_manifest_text(manifest))
    if missing:
        try:
            result.array_job = slurm.sbatch(layout.array_script,
                                            f"--array={index_ranges(missing)}")
        except SlurmError:
            if not known:  # nothing was submitted: the next attempt may change the arguments
                layout.manifest_path.unlink()
            raise
        merge_cmd[2] = f"--dependency=afterok:{result.array_job}"
    entry = {"submitted_at": utc_now(), "array_job": result.array_job, "shards": missing,
             "cancelled": result.cancelled}
    if manifest.merge:
        try:
            result.merge_job = slurm.sbatch(layout.merge_script, *merge_cmd[2:-1])
        except SlurmError:
            layout.add_submission(entry)  # the array runs: its tasks must be known to status
            raise
        entry["merge_job"] = result.merge_job
    layout.add_submission(entry)
    result.sbatch = ([array_cmd] if missing else []) + merge_cmds
    return result


def _manifest_text(manifest: Manifest) -> str:
    data = manifest.to_json()
    data["created_at"] = data["created_at"] or utc_now()
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
