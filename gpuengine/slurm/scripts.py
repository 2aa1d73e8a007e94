"""The two sbatch scripts of a cluster run: an array of N shard tasks, and the merge job that
runs after all of them (``afterok``). Plain bash a user can read, edit and ``sbatch`` by hand.

Each task is one node: one gpuengine process owning all the GPUs the task asked for
(``--gres=gpu:K``; none asked for with K = 0). It runs ``python -m gpuengine slurm shard OUT
$SLURM_ARRAY_TASK_ID`` with the Python that submitted (so it runs the same gpuengine), the
``PYTHONPATH`` that found it and the ``GPUENGINE_*``/cache variables of the submitting shell
exported. ``#SBATCH --signal=B:USR1@180`` warns the task 3 minutes before its time limit: it
stops claiming work, commits, and saves what it has for the next attempt.

The merge job is submitted with ``--kill-on-invalid-dep=yes`` in its script: when a task fails
or is cancelled, SLURM cancels the merge instead of leaving it pending for ever
(DependencyNeverSatisfied), and a resubmission submits a new one.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import gpuengine
from gpuengine import __version__
from gpuengine.slurm.layout import Manifest, RunLayout

SIGNAL_SECONDS = 180
"""How long before its time limit a task is told to stop (USR1)."""
_EXPORTED = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TORCH_HOME",
             "XDG_CACHE_HOME")


@dataclass(frozen=True)
class SbatchOptions:
    """What the jobs ask SLURM for (not part of the manifest: a resubmission may change them,
    e.g. a longer ``--time`` after a timeout)."""

    gpus_per_node: int = 1
    partition: str | None = None
    time: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    sbatch_args: tuple[str, ...] = ()
    local_dir: str | None = None
    """Node-local directory for the stores being written (None: ``$TMPDIR`` as the job sees
    it, else ``/tmp``). A ``$`` in it is expanded on the node."""


def job_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables the scripts export: ``PYTHONPATH`` (with the directory gpuengine was
    imported from, unless it is an installed package), every ``GPUENGINE_*`` but the test
    cluster's ``GPUENGINE_SLURM_*``, and the model caches' variables."""
    environ = dict(os.environ if environ is None else environ)
    root = str(Path(gpuengine.__file__).resolve().parent.parent)
    paths = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if Path(root).name not in ("site-packages", "dist-packages") and root not in paths:
        paths.insert(0, root)
    exported = {"PYTHONPATH": os.pathsep.join(paths)} if paths else {}
    for name in sorted(environ):
        if (name.startswith("GPUENGINE_") and not name.startswith("GPUENGINE_SLURM_")) \
                or name in _EXPORTED:
            exported[name] = environ[name]
    return exported


def _local_dir(value: str | None) -> str:
    if value is None:
        return '"${TMPDIR:-/tmp}"'
    if "$" in value:  # expanded on the node: quote everything else
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`") + '"'
    return shlex.quote(value)


def _resources(options: SbatchOptions, gpus: bool) -> list[str]:
    lines = ["--nodes=1", "--ntasks=1"]
    if gpus and options.gpus_per_node > 0:
        lines.append(f"--gres=gpu:{options.gpus_per_node}")
    if options.cpus_per_task:
        lines.append(f"--cpus-per-task={options.cpus_per_task}")
    if options.mem:
        lines.append(f"--mem={options.mem}")
    if options.time:
        lines.append(f"--time={options.time}")
    if options.partition:
        lines.append(f"--partition={options.partition}")
    return lines


def _script(header: list[str], directives: list[str], command: list[str],
            environment: dict[str, str]) -> str:
    lines = ["#!/bin/bash", *(f"# {line}" if line else "#" for line in header)]
    lines += [f"#SBATCH {d}" for d in directives]
    lines += ["", "set -euo pipefail"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in environment.items()]
    lines += ["exec " + " ".join(command), ""]
    return "\n".join(lines)


def _python() -> str:
    return shlex.quote(sys.executable or "python3")


def array_script(manifest: Manifest, layout: RunLayout, options: SbatchOptions,
                 environment: dict[str, str] | None = None) -> str:
    """The array of ``manifest.shards`` tasks (``--array=0-N-1``; a resubmission overrides
    it on the sbatch command line with the missing indices)."""
    n = manifest.shards
    shown = shlex.join(["gpuengine", manifest.command, *manifest.argv])
    header = [f"gpuengine {__version__}: the {n} shards of gpuengine {manifest.command} into "
              f"{layout.out}.",
              "Task I runs, on node-local disk (--local-dir, default $TMPDIR):",
              f"  {shown} --shard I/{n} ...",
              "then copies the closed shard to OUT/shards/ (temporary name, fsync, rename) and",
              "writes its done marker. Submit the same gpuengine slurm command again to run",
              "the shards without a marker; `gpuengine slurm status OUT` shows where they are."]
    directives = [f"--job-name=gpuengine-{manifest.command}", f"--array=0-{n - 1}",
                  *_resources(options, gpus=True), f"--signal=B:USR1@{SIGNAL_SECONDS}",
                  f"--output={layout.logs_dir}/{manifest.command}-%A_%a.log",
                  *options.sbatch_args]
    command = [_python(), "-m", "gpuengine", "slurm", "shard", shlex.quote(str(layout.out)),
               '"$SLURM_ARRAY_TASK_ID"', "--local-dir", _local_dir(options.local_dir)]
    return _script(header, directives, command,
                   job_environment() if environment is None else environment)


def merge_script(manifest: Manifest, layout: RunLayout, options: SbatchOptions,
                 environment: dict[str, str] | None = None) -> str:
    """The merge job: ``gpuengine slurm merge OUT`` (``gpuengine merge`` of the N shards into
    the merged store, and for predict the three output files of the whole input)."""
    what = ("and writes the prediction files of the whole input into OUT, as one run does"
            if manifest.command == "predict" else "")
    header = [f"gpuengine {__version__}: merges the {manifest.shards} shards of {layout.out}",
              f"into {manifest.merged} (gpuengine merge; on node-local disk first when OUT is",
              f"on a network filesystem) {what}".rstrip(),
              "Submitted with --dependency=afterok:<array job>."]
    directives = ["--job-name=gpuengine-merge", *_resources(options, gpus=False),
                  "--kill-on-invalid-dep=yes", f"--output={layout.logs_dir}/merge-%j.log",
                  *options.sbatch_args]
    command = [_python(), "-m", "gpuengine", "slurm", "merge", shlex.quote(str(layout.out)),
               "--local-dir", _local_dir(options.local_dir)]
    return _script(header, directives, command,
                   job_environment() if environment is None else environment)
