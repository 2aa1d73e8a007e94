"""Pure helpers of the daemon: file names, completeness checks, atomic JSON, error records."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import threading
import traceback
import zlib
from pathlib import Path
from typing import Any

from gpuengine import __version__
from gpuengine.daemon.constants import IGNORED_SUFFIXES, MARKER_SUFFIX
from gpuengine.vocabulary import utc_now


# ----------------------------------------------------------------------------- pure helpers


def is_ignored(name: str) -> bool:
    """Names the inbox never takes: dot-files, ``*.part``, ``*.tmp``, ``*.fai``, ``*.fxi`` and
    markers (``*.done``)."""
    return name.startswith(".") or name.endswith(IGNORED_SUFFIXES) or name.endswith(MARKER_SUFFIX)


def marker_name(name: str) -> str:
    """The marker that says ``name`` is complete."""
    return name + MARKER_SUFFIX


def is_gzip(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def gzip_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is whole gzip data: every member (multi-member/BGZF too) ends, with its
    trailer, and the last one exactly at the end of the file. Decompresses into nothing."""
    decompressor = zlib.decompressobj(wbits=31)
    with open(path, "rb") as fh:
        data = b""
        while True:
            if not data:
                data = fh.read(1 << 20)
                if not data:
                    return decompressor.eof
            if decompressor.eof:  # the previous member ended: the rest starts another one
                decompressor = zlib.decompressobj(wbits=31)
            try:
                decompressor.decompress(data, 1 << 16)
            except zlib.error:
                return False
            data = decompressor.unused_data if decompressor.eof else decompressor.unconsumed_tail


def ends_with_newline(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() == 0:
            return False
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) in (b"\n", b"\r")


def looks_complete(path: str | os.PathLike) -> bool:
    """The fallback's content check: whole gzip data, or plain text ending with a newline."""
    try:
        return gzip_complete(path) if is_gzip(path) else ends_with_newline(path)
    except OSError:
        return False


_TMP_COUNTER = itertools.count()


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON to a temporary file next to ``path``, fsync it, rename it over
    ``path``: readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_TMP_COUNTER)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, default=str, ensure_ascii=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def file_sha256(path: str | os.PathLike, stop: threading.Event | None = None) -> str | None:
    """Hex sha256 of the file; None if ``stop`` is set meanwhile."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            if stop is not None and stop.is_set():
                return None
            digest.update(chunk)
    return digest.hexdigest()


def free_name(directory: Path, name: str) -> str:
    """``name``, or ``stem~N.ext...`` when ``directory`` already holds a file of that name
    (a later file of the same name never overwrites an earlier one in done/ or failed/)."""
    if not (directory / name).exists():
        return name
    head, dot, tail = name.partition(".")
    for k in itertools.count(2):
        candidate = f"{head}~{k}{dot}{tail}"
        if not (directory / candidate).exists():
            return candidate
    raise AssertionError("unreachable")


def problem_json(problem: Any) -> dict[str, Any]:
    """A :class:`~gpuengine.records.RecordProblem` as JSON."""
    return {"kind": problem.kind, "file": os.path.basename(problem.path), "path": problem.path,
            "line": problem.line, "column": problem.column, "record": problem.record_id,
            "index": problem.index, "character": problem.character, "detail": problem.detail,
            "message": problem.describe()}


_LINE_IN_MESSAGE = (re.compile(r":(\d+)(?::(\d+))?: "), re.compile(r"after line (\d+)"))


def error_record(name: str, exc: BaseException, *, kind: str, attempts: int,
                 sha256: str | None, errors: list | None = None) -> dict[str, Any]:
    """The ``NAME.error.json`` of a failed file: the reason, where (record, line, column,
    character, from the input report's problems, or the line named in the message) and the
    attempts."""
    record: dict[str, Any] = {
        "file": name, "sha256": sha256, "kind": kind, "reason": str(exc),
        "error": type(exc).__name__, "attempts": attempts, "failed_at": utc_now(),
        "record": None, "position": None, "daemon": {"pid": os.getpid(), "version": __version__}}
    report = getattr(exc, "report", None)
    problems = [problem_json(p) for p in getattr(report, "problems", ())]
    if problems:
        first = problems[0]
        record.update(record=first["record"], character=first["character"],
                      position={"line": first["line"], "column": first["column"]},
                      problems=problems[:100], problem_count=report.problem_count)
    else:
        for pattern in _LINE_IN_MESSAGE:
            match = pattern.search(str(exc))
            if match:
                column = match.group(2) if match.lastindex and match.lastindex > 1 else None
                record["position"] = {"line": int(match.group(1)),
                                      "column": int(column) if column else None}
                break
    if kind not in ("input", "fidelity"):
        record["traceback"] = "".join(traceback.format_exception(type(exc), exc,
                                                                 exc.__traceback__))
    if errors:
        record["errors"] = errors
    return record
