"""The checks of a merge before anything is written (steps 1-3 of :mod:`.merge`): which
tables, the spec every table's copies share, whether an earlier merge of the same inputs is
resumed or complete, and the id check: no id may name two sequences.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gpuengine import __version__
from gpuengine.errors import StoreError, StoreMismatchError
from gpuengine.store import codec
from gpuengine.store.compat import TableCopy, combined_spec
from gpuengine.store.deferred import read_marker
from gpuengine.store.kway import block_items, has_equal_neighbours, merged_chunks
from gpuengine.store.schema import MAX_TABLES, TableSpec, blake2b16, canonical_json
from gpuengine.store.sources import EmptyEnvironment, Snapshot, is_store_dir

KINDS = ("emb", "ids")
"""The two databases of a table, in the order a merge writes them."""
_CHECK_ITEMS = 1 << 16
"""Ids per chunk of the id check (reads only)."""


class Interrupted(Exception):
    """A stop was asked for (Ctrl-C, SIGTERM): the merge ends between two chunks."""


class Progress(Protocol):
    def start(self, what: str, total: int) -> None: ...
    def advance(self, done: int, nbytes: int = 0) -> None: ...


def merge_run_id(paths: list[str]) -> str:
    """The merge record's key: the same inputs, in the same order, give the same record."""
    real = [os.path.realpath(p) for p in paths]
    return "merge-" + blake2b16(canonical_json(real)).hex()[:16]


@dataclass
class Plan:
    """What the checks found: the tables and their specs, and how the merge goes on."""

    out: str
    run_id: str
    tables: list[str]
    specs: dict[str, TableSpec]
    mode: str
    """fresh, resume, restart (an input changed: passes start over) or complete."""
    progress: dict[str, dict[str, Any]]
    info: dict[str, Any]
    estimate: int
    """Bytes OUT may need: its own size plus the inputs'."""
    deferrable: bool = False
    """OUT holds nothing of its own (new, empty, or an unfinished deferred merge's output):
    its commits may be flushed late (:mod:`gpuengine.store.deferred`)."""


def _fresh_progress(tables: list[str]) -> dict[str, dict[str, Any]]:
    return {t: {"checked": False,
                "emb": {"after": None, "done": False, "added": 0, "duplicates": 0,
                        "differing": 0, "differing_existing": 0},
                "ids": {"after": None, "done": False, "added": 0, "duplicates": 0}}
            for t in tables}


def make_plan(out: str, snaps: list[Snapshot], progress: Progress) -> Plan:
    tables = list(dict.fromkeys(t for s in snaps for t in s.tables))
    run_id = merge_run_id([s.path for s in snaps])
    with ExitStack() as stack:
        target = _open_target(out, stack)
        known = set(tables) | set(target.tables if target else ())
        if len(known) > MAX_TABLES:
            raise StoreError(f"the merged store would hold {len(known)} tables; a store holds "
                             f"at most {MAX_TABLES}")
        specs = {t: combined_spec(_copies(t, target, snaps)) for t in tables}
        info = _info(snaps, target is not None)
        record = _load_record(target, run_id)
        mode, state = _resume_state(record, info, tables)
        for table in tables:
            holders = [s for s in ([target] if target else []) + snaps if table in s.specs]
            if not state[table]["checked"] and len(holders) > 1:
                _check_ids(table, holders, progress)
            state[table]["checked"] = True
        size = sum(map(_used_size, snaps)) + (_used_size(target) if target else 0)
        deferrable = (target is None or read_marker(Path(out)) is not None
                      or (not target.runs and not any(n for c in target.counts.values()
                                                      for n in c.values())))
    return Plan(out, run_id, tables, specs, mode, state, info,
                 estimate=int(size * 1.15) + (64 << 20), deferrable=deferrable)


def _open_target(out: str, stack: ExitStack) -> Snapshot | None:
    """OUT as it is before the merge, or None when it is new (or an empty environment left
    by a kill before a new store's first commit)."""
    if not is_store_dir(out):
        return None
    try:
        return stack.enter_context(Snapshot(out, label=f"{out} (the output)"))
    except EmptyEnvironment:
        return None


def _copies(table: str, target: Snapshot | None, snaps: list[Snapshot]) -> list[TableCopy]:
    holders = [s for s in ([target] if target else []) + snaps if table in s.specs]
    return [TableCopy(s.label, s.specs[table],
                      s.precisions() if s.specs[table].precision is None else ())
            for s in holders]


def _used_size(snap: Snapshot) -> int:
    """Bytes of a store's pages in use (its data.mdb may be longer)."""
    env = snap.env.env
    return (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])


def _info(snaps: list[Snapshot], out_existed: bool) -> dict[str, Any]:
    """The merge record's ``info``: every input with its fingerprint, shard labels and the
    inputs its runs recorded."""
    stores = []
    for snap in snaps:
        runs = []
        for run_id, record in sorted(snap.run_records().items()):
            run_info = record.get("info") if isinstance(record.get("info"), dict) else {}
            runs.append({"run_id": run_id, "status": record.get("status"),
                         **{k: run_info[k] for k in ("command", "inputs", "shard",
                                                     "input_fingerprint", "precision")
                            if k in run_info}})
        stores.append({"path": snap.path, "tag": snap.tag, "shards": snap.shard_labels(),
                       "fingerprint": snap.fingerprint(), "runs": runs})
    return {"command": "merge", "engine_version": __version__, "out_existed": out_existed,
            "stores": stores}


def _load_record(target: Snapshot | None, run_id: str) -> dict[str, Any] | None:
    if target is None:
        return None
    return target.run_records().get(run_id)


def _resume_state(record: dict[str, Any] | None, info: dict[str, Any],
                  tables: list[str]) -> tuple[str, dict[str, dict[str, Any]]]:
    """(mode, progress) from an earlier record of the same merge."""
    if record is None or not isinstance(record.get("progress"), dict):
        return "fresh", _fresh_progress(tables)
    before = [s.get("fingerprint") for s in record.get("info", {}).get("stores", [])]
    now = [s["fingerprint"] for s in info["stores"]]
    if before != now:
        return "restart", _fresh_progress(tables)
    state = _fresh_progress(tables)
    for table, saved in record["progress"].items():
        if table in state:
            state[table] = saved
    return ("complete" if record.get("status") == "complete" else "resume"), state


def _check_ids(table: str, holders: list[Snapshot], progress: Progress) -> None:
    """StoreMismatchError for the first id that two stores map to different sequences."""
    total = sum(s.counts[table]["ids"] for s in holders)
    progress.start(f"checking ids of table {table}", total)
    cursors = [(s.cursor(table, "ids"), block_items(_CHECK_ITEMS * 32, len(holders), 32))
               for s in holders]
    try:  # keys only: the values of a key held twice are fetched when one is found
        for keys in merged_chunks(cursors, None, _CHECK_ITEMS, keys_only=True):
            if has_equal_neighbours(keys):
                for i in range(1, len(keys)):
                    if keys[i] == keys[i - 1]:
                        copies = [(s.label, s.get(table, "ids", keys[i])) for s in holders]
                        if len({bytes(v[:16]) for _, v in copies if v is not None}) > 1:
                            raise id_conflict(table, keys[i], copies, "Nothing was written.")
            progress.advance(len(keys))
    finally:
        for cursor, _ in cursors:
            cursor.close()


def id_conflict(table: str, key: bytes, copies: list[tuple[str, bytes | None]],
                 note: str) -> StoreMismatchError:
    """The error naming an id and two stores (of ``copies``: (store label, ids value or
    None)) that map it to different sequences."""
    held = [(label, bytes(value)) for label, value in copies if value is not None]
    (label_a, a), (label_b, b) = next(
        ((x, y) for i, x in enumerate(held) for y in held[i + 1:] if x[1][:16] != y[1][:16]),
        (held[0], held[-1]))
    record_id = codec.decode_id(key, a)
    return StoreMismatchError(
        f"record id {record_id!r} of table {table!r} names different sequences in "
        f"{label_a} (digest {a[:16].hex()}) and {label_b} (digest {b[:16].hex()}); an id "
        f"must name one sequence: rename the record in one input and re-embed it, or leave "
        f"one store out. {note}")
