"""``gpuengine slurm status OUT``: where every shard and the merge of a cluster run are.

The done markers say which shards are finished (the only proof); for the others, and for the
merge, SLURM says what their latest submission's job is doing (``squeue``, ``sacct`` when
accounting works). Without the SLURM commands (on a machine outside the cluster) only the
markers are read. A task cancelled before it started leaves no record in SLURM: such a shard is
``missing``. A run submitted with ``--no-merge`` has no merge job: its merge is ``skipped``,
never a failure. torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpuengine.slurm.layout import RunLayout, layout_for, read_marker
from gpuengine.slurm.queue import JobState, Slurm
from gpuengine.slurm.submit import index_ranges


@dataclass
class Part:
    """One shard, or the merge."""

    name: str
    state: str
    """done, running, pending, failed, missing, not submitted (or unknown without SLURM);
    the merge of a ``--no-merge`` run: skipped."""
    job: str = ""
    detail: str = ""
    log: str = ""


def _describe(job: str, state: JobState | None, slurm_known: bool) -> tuple[str, str]:
    if state is None:
        if not slurm_known:
            return "unknown", "no SLURM commands here: only the done markers were read"
        return "missing", f"job {job} has no record (cancelled before it started?)"
    if state.state == "PENDING":
        return "pending", f"job {job} pending ({state.reason or 'queued'})"
    if state.active:
        return "running", f"job {job} {state.state.lower()}"
    if state.state == "COMPLETED":
        return "failed", f"job {job} completed without a done marker (see its log)"
    exit_code = f", exit {state.exit_code}" if state.exit_code else ""
    reason = f", {state.reason}" if state.reason not in ("", "None") else ""
    return "failed", f"job {job} {state.state}{exit_code}{reason}"


def _latest(layout: RunLayout, index: int | None) -> tuple[str, str]:
    """(job id, log path) of the latest submission of shard ``index`` (None: the merge)."""
    for entry in reversed(layout.submissions()):
        if index is None and entry.get("merge_job"):
            job = str(entry["merge_job"])
            return job, str(layout.logs_dir / f"merge-{job}.log")
        if index is not None and entry.get("array_job") and index in entry.get("shards", ()):
            array = str(entry["array_job"])
            return (f"{array}_{index}",
                    str(layout.logs_dir / f"{layout.command}-{array}_{index}.log"))
    return "", ""


def collect(out: Path, slurm: Slurm | None = None) -> dict[str, Any]:
    """The run's status as a dict (what ``--json`` prints)."""
    layout = layout_for(out)
    manifest = layout.read_manifest()
    n = manifest.shards
    slurm = slurm or Slurm()
    known = slurm.available()
    jobs = [_latest(layout, i)[0] for i in range(n)] + [_latest(layout, None)[0]]
    states = slurm.states(sorted({j.split("_")[0] for j in jobs if j})) if known else {}
    shards = []
    for i in range(n):
        marker = read_marker(layout.shard_marker(i, n))
        job, log = _latest(layout, i)
        if marker is not None:
            part = Part(f"{i}/{n}", "done", job, _done_detail(marker))
        elif not job:
            part = Part(f"{i}/{n}", "not submitted")
        else:
            state, detail = _describe(job, states.get(job), known)
            part = Part(f"{i}/{n}", state, job, detail, log if state == "failed" else "")
        if part.state != "done" and (layout.partial_store(i, n) / "data.mdb").exists():
            part.detail += "; partial store saved (the next attempt resumes it)"
        shards.append(part)
    merged = manifest.merge or layout.merged_marker.exists()  # slurm merge run by hand
    merge = _merge_part(layout, states, known) if merged else Part(
        "merge", "skipped", detail=f"--no-merge: read {layout.shards_dir} as one store, or "
        f"gpuengine merge {manifest.merged} {layout.shards_dir}")
    counts = {s: sum(1 for p in shards if p.state == s)
              for s in ("done", "running", "pending", "failed", "missing", "not submitted",
                        "unknown")}
    return {"out": str(layout.out), "command": manifest.command, "shards": n,
            "merged": manifest.merged, "no_merge": not manifest.merge, "counts": counts,
            "slurm": known,
            "shard_states": [asdict(p) for p in shards], "merge": asdict(merge)}


def _done_detail(marker: dict[str, Any]) -> str:
    records = marker.get("shard_records", marker.get("reads"))
    what = "records" if "shard_records" in marker else "reads"
    failed = f", {marker['failed']} failed" if marker.get("failed") else ""
    job = marker.get("job", {}).get("slurmd_nodename") or marker.get("host", "")
    return f"{records} {what}{failed} ({job}, {marker.get('seconds', '?')} s)"


def _merge_part(layout: RunLayout, states: dict[str, JobState], known: bool) -> Part:
    marker = read_marker(layout.merged_marker)
    job, log = _latest(layout, None)
    if marker is not None:
        failed = f"; {marker['failed']} sequences failed in the shards" if marker.get("failed") \
            else ""
        return Part("merge", "done", job, f"into {marker.get('merged')}{failed}")
    if not job:
        return Part("merge", "not submitted")
    state = states.get(job)
    if state is not None and state.state == "PENDING" and state.reason == "Dependency":
        return Part("merge", "pending", job, f"job {job} waits for the shards")
    if state is not None and state.reason == "DependencyNeverSatisfied":
        return Part("merge", "failed", job, f"job {job} {state.state.lower()}: a shard failed "
                    "or was cancelled; submit the same command again")
    status, detail = _describe(job, state, known)
    return Part("merge", status, job, detail, log if status == "failed" else "")


def render(status: dict[str, Any]) -> str:
    """The status as text: a line per shard not done, the done ones as ranges."""
    counts = status["counts"]
    n = status["shards"]
    merged = ("--no-merge" if status.get("no_merge") else f"merged store {status['merged']}")
    lines = [f"gpuengine slurm {status['command']}: {status['out']} ({n} shards; {merged})",
             "shards: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v or k == "done")]
    done = [i for i, p in enumerate(status["shard_states"]) if p["state"] == "done"]
    if done:
        lines.append(f"  done: {index_ranges(done)}")
    for part in status["shard_states"]:
        if part["state"] != "done":
            log = f"; log {part['log']}" if part["log"] else ""
            lines.append(f"  shard {part['name']}: {part['state']}"
                         f"{': ' + part['detail'] if part['detail'] else ''}{log}")
    merge = status["merge"]
    log = f"; log {merge['log']}" if merge["log"] else ""
    lines.append(f"merge: {merge['state']}{': ' + merge['detail'] if merge['detail'] else ''}{log}")
    stuck = [p["name"] for p in status["shard_states"]
             if p["state"] in ("failed", "missing", "not submitted")]
    if stuck or merge["state"] in ("failed", "missing", "not submitted"):
        then = "" if status.get("no_merge") else ", then the merge"
        lines.append(f"next: submit the same gpuengine slurm {status['command']} command again "
                     f"(it runs only the {len(stuck)} shards without a done marker{then})")
    if not status["slurm"]:
        lines.append("(no SLURM commands here: states from the done markers only)")
    return "\n".join(lines)


def exit_code(status: dict[str, Any]) -> int:
    """1 when a shard or the merge failed or went missing (a resubmission is needed)."""
    bad = ("failed", "missing")
    return int(any(p["state"] in bad for p in status["shard_states"])
               or status["merge"]["state"] in bad)
