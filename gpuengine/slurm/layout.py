"""The output directory of a cluster run, and moving closed stores into it safely.

``gpuengine slurm embed|predict ... --out OUT`` lays OUT out as::

    OUT/slurm/job.json                 the manifest: command, arguments, shard count
    OUT/slurm/submissions.jsonl        one line per submission: array and merge job ids
    OUT/slurm/<command>-array.sbatch   the array of N shard tasks
    OUT/slurm/merge.sbatch             the merge job (afterok on the array; not with --no-merge)
    OUT/slurm/logs/                    the jobs' logs
    OUT/slurm/merge.done               written when the merge step finished
    OUT/shards/shard-IIII-of-NNNN.lmdb the published shard stores
    OUT/shards/shard-IIII-of-NNNN.done their done markers (JSON: counts, job, host)
    OUT/shards/.shard-IIII-of-NNNN.partial.lmdb   an interrupted shard, kept to resume from
    OUT/store.lmdb                     embed: the merged store
    OUT/embeddings.lmdb, OUT/prediction_results*   predict: as one run writes them

A store is written only on node-local disk (LMDB must not be written on a network
filesystem); :func:`publish_store` copies a *closed* store into OUT under a hidden temporary
name, fsyncs it and renames it into place, and :func:`write_marker` then writes the marker
the same way. A marker is the only proof that a shard is complete: a store without one (a
task that died between the rename and the marker) is replaced by the next attempt. The hidden
temporaries a task killed mid-copy leaves next to its shard's files are removed by the next
attempt of that shard (:func:`remove_temporaries`, scoped to that shard's names).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpuengine.errors import UsageError
from gpuengine.shards import shard_name
from gpuengine.vocabulary import utc_now

MANIFEST_VERSION = 1
STORE_FILES = ("data.mdb",)
"""What a closed store consists of (``lock.mdb`` is recreated by whoever opens it)."""


@dataclass(frozen=True)
class Manifest:
    """What was submitted into OUT; a resubmission must match it."""

    command: str
    """``embed`` or ``predict``."""
    argv: tuple[str, ...]
    """The plain command's arguments (absolute paths), without ``--out``, ``--store``,
    ``--json``: the tasks add their own."""
    shards: int
    out: str
    merged: str
    """The merged store's path."""
    python: str = ""
    engine_version: str = ""
    created_at: str = ""
    version: int = MANIFEST_VERSION
    merge: bool = True
    """False: submitted with ``--no-merge`` (the array only; OUT/shards is read as one store
    or merged later)."""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["argv"] = list(self.argv)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["argv"] = tuple(fields.get("argv", ()))
        return cls(**fields)

    def differences(self, other: Manifest) -> list[str]:
        """What ``other`` (a new submission) changes that the shards depend on."""
        found = []
        if self.command != other.command:
            found.append(f"command {self.command} → {other.command}")
        if self.shards != other.shards:
            found.append(f"--shards {self.shards} → {other.shards}")
        if self.argv != other.argv:
            found.append(f"arguments {' '.join(self.argv)!r} → {' '.join(other.argv)!r}")
        if self.merged != other.merged:
            found.append(f"merged store {self.merged} → {other.merged}")
        if self.merge != other.merge:
            found.append("--no-merge given now (the run was submitted with a merge job)"
                         if self.merge else
                         "--no-merge missing (the run was submitted with --no-merge)")
        return found


@dataclass(frozen=True)
class RunLayout:
    """The paths of one cluster run under ``out``."""

    out: Path
    command: str = "embed"

    @property
    def slurm_dir(self) -> Path:
        return self.out / "slurm"

    @property
    def shards_dir(self) -> Path:
        return self.out / "shards"

    @property
    def logs_dir(self) -> Path:
        return self.slurm_dir / "logs"

    @property
    def manifest_path(self) -> Path:
        return self.slurm_dir / "job.json"

    @property
    def submissions_path(self) -> Path:
        return self.slurm_dir / "submissions.jsonl"

    @property
    def array_script(self) -> Path:
        return self.slurm_dir / f"{self.command}-array.sbatch"

    @property
    def merge_script(self) -> Path:
        return self.slurm_dir / "merge.sbatch"

    @property
    def merged_marker(self) -> Path:
        return self.slurm_dir / "merge.done"

    def shard_store(self, index: int, count: int) -> Path:
        return self.shards_dir / f"{shard_name(index, count)}.lmdb"

    def shard_marker(self, index: int, count: int) -> Path:
        return self.shards_dir / f"{shard_name(index, count)}.done"

    def partial_store(self, index: int, count: int) -> Path:
        return self.shards_dir / f".{shard_name(index, count)}.partial.lmdb"

    def done(self, count: int) -> set[int]:
        """The shards whose done marker exists."""
        return {i for i in range(count) if self.shard_marker(i, count).exists()}

    def read_manifest(self) -> Manifest:
        try:
            data = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise UsageError(f"{self.out} is not the output of gpuengine slurm embed/predict "
                             f"(no {self.manifest_path})") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {self.manifest_path}: {exc}") from None
        return Manifest.from_json(data)

    def submissions(self) -> list[dict[str, Any]]:
        """Every submission recorded, oldest first (unreadable lines are skipped)."""
        try:
            lines = self.submissions_path.read_text().splitlines()
        except OSError:
            return []
        found = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                found.append(entry)
        return found

    def add_submission(self, entry: dict[str, Any]) -> None:
        with open(self.submissions_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def layout_for(out: Path) -> RunLayout:
    """The layout of an existing run (its command from the manifest)."""
    base = RunLayout(Path(out).resolve())
    return RunLayout(base.out, base.read_manifest().command)


# ----------------------------------------------------------------------------- safe moves


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network filesystems refuse fsync on a directory
    finally:
        os.close(fd)


def _copy_synced(src: Path, dest: Path) -> None:
    with open(src, "rb") as source, open(dest, "wb") as target:
        shutil.copyfileobj(source, target, 16 << 20)
        target.flush()
        os.fsync(target.fileno())


def _temporary(dest: Path, what: str) -> Path:
    return dest.parent / f".{dest.name}.{what}-{socket.gethostname()}-{os.getpid()}"


def publish_store(src: Path, dest: Path) -> None:
    """Copy the closed store ``src`` (a directory) to ``dest``, any filesystem to any other:
    into a hidden temporary directory next to ``dest``, each file fsynced, then renamed into
    place (an earlier ``dest`` is replaced) and the parent directory fsynced. Readers of the
    parent (a directory of stores) never see a half-copied store: hidden names are ignored."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(dest, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name in STORE_FILES:
            _copy_synced(src / name, tmp / name)
        _fsync_dir(tmp)
        if dest.exists():
            old = _temporary(dest, "old")
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(dest.parent)


def remove_temporaries(layout: RunLayout, index: int, count: int) -> list[str]:
    """Remove the hidden temporaries (``.NAME.tmp-HOST-PID``, ``.NAME.old-HOST-PID``) that an
    attempt of shard ``index`` killed mid-copy left next to its store, marker and partial store;
    only this shard's names, so another task's copy in progress is never touched. An ``old``
    partial store whose replacement never arrived (killed between the two renames) is put back,
    not removed: the next attempt resumes from it. Returns the names handled."""
    handled = []
    try:
        entries = list(layout.shards_dir.iterdir())
    except FileNotFoundError:
        return handled
    partial = layout.partial_store(index, count)
    dests = (layout.shard_store(index, count), layout.shard_marker(index, count), partial)
    for entry in sorted(entries):
        dest = next((d for d in dests if entry.name.startswith(f".{d.name}.tmp-")
                     or entry.name.startswith(f".{d.name}.old-")), None)
        if dest is None:
            continue
        if dest == partial and ".old-" in entry.name and not partial.exists():
            os.rename(entry, partial)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        handled.append(entry.name)
    if handled:
        _fsync_dir(layout.shards_dir)
    return handled


def copy_store(src: Path, dest: Path) -> None:
    """Copy the closed store ``src`` to a new directory ``dest`` (node-local; no fsync)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in STORE_FILES:
        shutil.copyfile(src / name, dest / name)


def write_marker(path: Path, data: dict[str, Any]) -> None:
    """Write JSON ``data`` to ``path`` atomically (temporary name, fsync, rename, fsync)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, "tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({**data, "written_at": utc_now(), "host": socket.gethostname()}, handle,
                  indent=2, sort_keys=True, default=str)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(tmp, path)
    _fsync_dir(path.parent)


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
