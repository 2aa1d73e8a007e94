"""What the jobs of a cluster run do: one shard (``gpuengine slurm shard OUT I``) and the merge
(``gpuengine slurm merge OUT``). Torch-free: the embedding runs in a child process, the plain
``gpuengine embed|predict`` command with ``--shard I/N``.

**A shard task**

1. A done marker already there: nothing to do (a requeued task whose shard was published).
2. Hidden temporaries an earlier attempt killed mid-copy left in OUT/shards/ under this
   shard's names are removed (:func:`~gpuengine.slurm.layout.remove_temporaries`). The
   shard's store is written in ``LOCAL/gpuengine-<OUT tag>-shard-IIII-of-NNNN/`` on
   node-local disk. It resumes what is there (the same node ran it before), else a partial
   store an interrupted attempt saved in ``OUT/shards/.shard-…partial.lmdb``, else starts
   empty.
3. The child runs ``gpuengine embed ARGS --shard I/N --out LOCAL/…/shard.lmdb --json`` (predict:
   ``--out LOCAL/…/out --store LOCAL/…/shard.lmdb``); its summary comes back on stdout, its
   log goes to the task's log. SIGUSR1 (``--signal=B:USR1@…``, the time limit coming) is passed
   on as SIGTERM; SLURM's own SIGTERM (scancel, time limit, preemption) reaches the child
   directly, so the task only waits for it to drain and commit.
4. Exit 0 (or 3: some sequences failed, counted in the marker): the closed store is published
   to ``OUT/shards/shard-IIII-of-NNNN.lmdb`` (:func:`~gpuengine.slurm.layout.publish_store`),
   then the done marker is written, the partial copy and the local directory removed; the task
   exits 0. Otherwise (interrupted, failed) whatever was committed is saved as the partial
   store and the task exits with the child's status, so ``afterok`` never starts the merge.

**The merge** checks that all N shards have their marker, merges them (in shard order) into
the merged store — in place when OUT is on a local filesystem, else on node-local disk and
then published — and for ``predict`` writes the three output files of the whole input with
``gpuengine predict ARGS --store MERGED --score-only`` (one run's files, in one run's order).
It writes ``OUT/slurm/merge.done`` last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpuengine.errors import EXIT_OK, EXIT_PARTIAL, GpuEngineError
from gpuengine.shards import Shard
from gpuengine.slurm.layout import (Manifest, RunLayout, copy_store, layout_for, publish_store,
                                    read_marker, remove_temporaries, write_marker)

log = logging.getLogger("gpuengine.slurm")

GPUENGINE_COMMAND = (sys.executable, "-m", "gpuengine")
"""How a task starts the plain ``gpuengine`` command (the interpreter the task runs under;
tests start it through their own entry point to hold the run at a defined point)."""


def _job() -> dict[str, str]:
    keys = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURMD_NODENAME")
    return {k.lower(): os.environ[k] for k in keys if k in os.environ}


def _work_dir(local_dir: Path, layout: RunLayout, name: str) -> Path:
    tag = hashlib.blake2b(str(layout.out).encode(), digest_size=4).hexdigest()
    return local_dir / f"gpuengine-{tag}-{name}"


def task_argv(manifest: Manifest, shard: Shard, work: Path) -> list[str]:
    """The plain command a shard task runs (``gpuengine`` arguments)."""
    store = str(work / "shard.lmdb")
    if manifest.command == "predict":
        outputs = ["--out", str(work / "out"), "--store", store]
    else:
        outputs = ["--out", store]
    return [manifest.command, *manifest.argv, "--shard", shard.label, *outputs, "--json"]


class _Child:
    """The plain gpuengine command in a child process: USR1 to this process is passed on as
    SIGTERM; SIGTERM/SIGINT here only note that the job is ending (SLURM signals every process
    of the job, the child included, and a second SIGTERM would make it quit at once)."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.proc: subprocess.Popen | None = None
        self.ending = False

    def _forward(self, signum, frame) -> None:
        self.ending = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def _note(self, signum, frame) -> None:
        self.ending = True

    def run(self) -> tuple[int, dict[str, Any] | None]:
        handlers = {signal.SIGUSR1: self._forward, signal.SIGTERM: self._note,
                    signal.SIGINT: self._note}
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        try:
            self.proc = subprocess.Popen([*GPUENGINE_COMMAND, *self.argv],
                                         stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            out = self.proc.stdout.read()
            code = self.proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        try:
            summary = json.loads(out) if out.strip() else None
        except ValueError:
            summary = None
        return (128 - code if code < 0 else code), summary


def _shard_counts(command: str, summary: dict[str, Any] | None) -> dict[str, Any]:
    if not summary:
        return {}
    if command == "predict":
        keys = ("reads", "valid_reads", "chunks", "frames", "virus_chunks")
        counts = {k: summary.get(k) for k in keys}
        counts["embedded"] = {name: e.get("embedded") for name, e in
                              summary.get("embed", {}).items()}
        return counts
    keys = ("shard_records", "valid_records", "committed_records", "embedded", "already_stored",
            "deduplicated", "truncated", "tokens", "wall_seconds", "tokens_per_second")
    counts = {k: summary.get(k) for k in keys}
    failed = summary.get("failed") or []
    counts["failed"] = len(failed)
    counts["failed_examples"] = failed[:20]
    return counts


def run_shard(out: Path, index: int, local_dir: Path) -> int:
    """One array task (see the module docstring); its exit status."""
    layout = layout_for(out)
    manifest = layout.read_manifest()
    shard = Shard(index, manifest.shards)
    n = manifest.shards
    marker = layout.shard_marker(index, n)
    if marker.exists():
        log.info("shard %s is done already (%s): nothing to do", shard.label, marker)
        return EXIT_OK
    left = remove_temporaries(layout, index, n)
    if left:
        log.info("an earlier attempt of shard %s was killed mid-copy: handled %s", shard.label,
                 ", ".join(left))
    work = _work_dir(Path(local_dir), layout, shard.name)
    work.mkdir(parents=True, exist_ok=True)
    store, partial = work / "shard.lmdb", layout.partial_store(index, n)
    if (store / "data.mdb").exists():
        log.info("resuming the shard store left on this node: %s", store)
    elif (partial / "data.mdb").exists():
        log.info("resuming from the partial shard saved by an earlier attempt: %s", partial)
        copy_store(partial, store)
    argv = task_argv(manifest, shard, work)
    log.info("shard %s of %s on %s: gpuengine %s", shard.label, layout.out,
             os.uname().nodename, " ".join(argv))
    started = time.time()
    child = _Child(argv)
    code, summary = child.run()
    if code in (EXIT_OK, EXIT_PARTIAL) and (store / "data.mdb").exists():
        publish_store(store, layout.shard_store(index, n))
        write_marker(marker, {"shard": shard.label, "index": index, "count": n,
                              "command": manifest.command, "exit_code": code,
                              "store": layout.shard_store(index, n).name,
                              "seconds": round(time.time() - started, 3), "job": _job(),
                              **_shard_counts(manifest.command, summary)})
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        log.info("shard %s published to %s", shard.label, layout.shard_store(index, n))
        return EXIT_OK
    if (store / "data.mdb").exists():
        log.info("shard %s stopped (exit %d): saving what it committed to %s", shard.label,
                 code, partial)
        publish_store(store, partial)
    return code or 1


def _missing(layout: RunLayout, n: int) -> list[int]:
    return [i for i in range(n) if not layout.shard_marker(i, n).exists()]


def _merge_into(target: Path, stores: list[Path]) -> dict[str, Any]:
    from gpuengine.display import MergeBar
    from gpuengine.signals import StopOnSignals
    from gpuengine.store.merge import merge_stores

    bar = MergeBar(enabled=True)
    try:
        with StopOnSignals() as stop:
            summary = merge_stores(target, stores, progress=bar, stop=stop)
    finally:
        bar.close()
    if summary.exit_code:
        raise GpuEngineError(f"the merge into {target} stopped (exit {summary.exit_code}); "
                             "what it wrote is kept: run the merge job again to finish")
    return summary.to_json()


def merge_in_place(target: Path) -> bool:
    """Whether the merged store may be written where it is to end up: not on a network
    filesystem (LMDB's rule), judged by the filesystem of its nearest existing parent."""
    from gpuengine.daemon.events import filesystem_type, is_network_filesystem

    probe = target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return not is_network_filesystem(filesystem_type(probe))


def run_merge(out: Path, local_dir: Path, in_place: bool | None = None) -> int:
    """The merge job (see the module docstring); its exit status."""
    layout = layout_for(out)
    manifest = layout.read_manifest()
    n = manifest.shards
    missing = _missing(layout, n)
    if missing:
        raise GpuEngineError(
            f"{len(missing)} of {n} shards have no done marker in {layout.shards_dir} "
            f"({', '.join(f'{i}/{n}' for i in missing[:20])}); nothing was merged: submit the "
            "same gpuengine slurm command again to run them")
    if layout.merged_marker.exists():
        log.info("already merged (%s): nothing to do", layout.merged_marker)
        return EXIT_OK
    target = Path(manifest.merged)
    stores = [layout.shard_store(i, n) for i in range(n)]
    started = time.time()
    in_place = merge_in_place(target) if in_place is None else in_place
    if in_place:
        log.info("merging %d shards into %s", n, target)
        merged = _merge_into(target, stores)
    elif (target / "data.mdb").exists():
        log.info("%s was published by an earlier merge job: not merged again", target)
        merged = {}
    else:
        staging = _work_dir(Path(local_dir), layout, "merge") / target.name
        shutil.rmtree(staging, ignore_errors=True)
        log.info("merging %d shards into %s on node-local disk (%s is on a network "
                 "filesystem), then copying it there", n, staging, target.parent)
        merged = _merge_into(staging, stores)
        publish_store(staging, target)
        shutil.rmtree(staging.parent, ignore_errors=True)
    record: dict[str, Any] = {"command": manifest.command, "shards": n, "merged": str(target),
                              "in_place": in_place, "merge": merged, "job": _job()}
    if manifest.command == "predict":
        record["predict"] = _write_predictions(manifest, target)
    failed = sum((read_marker(layout.shard_marker(i, n)) or {}).get("failed") or 0
                 for i in range(n))
    record.update(seconds=round(time.time() - started, 3), failed=failed)
    write_marker(layout.merged_marker, record)
    log.info("merged %d shards into %s%s", n, target,
             f"; {failed} sequences failed in the shards (see their markers)" if failed else "")
    return EXIT_PARTIAL if failed else EXIT_OK


def _write_predictions(manifest: Manifest, store: Path) -> dict[str, Any]:
    argv = ["predict", *manifest.argv, "--out", manifest.out, "--store", str(store),
            "--score-only", "--json"]
    log.info("writing the predictions of the whole input: gpuengine %s", " ".join(argv))
    code, summary = _Child(argv).run()
    if code != EXIT_OK:
        raise GpuEngineError(f"gpuengine predict --score-only exited {code}; the merged store "
                             f"{store} is complete: run the merge job again to retry")
    return {k: (summary or {}).get(k) for k in ("reads", "chunks", "frames", "virus_chunks")}
