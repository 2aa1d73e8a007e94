"""Stores made for the merge and multi-store tests: one table written through the real
``StoreWriter``, split into shards by sequence digest the way ``--shard I/N`` splits input,
and raw dumps of a store's databases for byte-for-byte comparisons."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from gpuengine.store import CommitEntry, ModelIdentity, OutputSpec, StoreWriter, TableSpec
from gpuengine.store.codec import sequence_digest
from gpuengine.store.merge import NoProgress
from gpuengine.store.sources import Snapshot

MEAN = OutputSpec(6, "mean")
TOKENS = OutputSpec(6, "per-token")


def make_spec(name: str = "default", outputs: tuple[OutputSpec, ...] = (MEAN, TOKENS),
              store_dtype: str = "float16", sha256: str = "ab" * 32, dim: int = 8,
              max_residues: int | None = 1022, precision: str | None = "fp32") -> TableSpec:
    model = ModelIdentity(family="esm2", name="esm2_t6_8M_UR50D", sha256=sha256,
                          num_layers=6, embed_dim=dim, attention_heads=4, vocab_size=33)
    return TableSpec(name=name, model=model, outputs=outputs, store_dtype=store_dtype,
                     dim=dim, max_residues=max_residues, precision=precision)


def records(n: int, seed: int = 0, prefix: str = "") -> list[tuple[str, str]]:
    """``n`` (id, sequence) records (ids start with ``prefix``): some ids share a
    sequence, some ids are long."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        seq = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), int(rng.integers(3, 12))))
        rid = f"{prefix}rec{i:05d}" if i % 50 else f"{prefix}long{i}-" + "x" * 600
        out.append((rid, seq))
    out += [(f"{prefix}alias{i}", out[i][1]) for i in range(0, n, 7)]  # same sequence, other id
    return out


def vectors(spec: TableSpec, seq: str) -> dict[OutputSpec, np.ndarray]:
    """Deterministic vectors of a sequence (the same in every store)."""
    rng = np.random.default_rng(int.from_bytes(sequence_digest(seq)[:8], "little"))
    return {o: rng.standard_normal((len(seq), spec.dim) if o.per_token else spec.dim)
            for o in spec.outputs}


def write_store(path: Path, spec: TableSpec, recs: list[tuple[str, str]], *,
                run: dict | None = None, group: int = 40) -> Path:
    """A store holding ``recs`` (one commit per ``group`` records), and a run record."""
    with StoreWriter(path) as writer:
        writer.open_table(spec)
        run_id = None
        if run is not None:
            run_id = run.pop("run_id", "run-1")
            writer.begin_run(run_id, run)
        for start in range(0, len(recs), group):
            by_seq: dict[str, list[str]] = {}
            for rid, seq in recs[start:start + group]:
                by_seq.setdefault(seq, []).append(rid)
            done = writer.lookup(spec.name).has_embeddings([sequence_digest(s) for s in by_seq])
            entries = [CommitEntry(sequence_digest(seq), tuple(rids),
                                   None if stored else vectors(spec, seq))
                       for (seq, rids), stored in zip(by_seq.items(), done)]
            writer.commit(spec.name, entries, run_id=run_id)
        if run_id is not None:
            writer.finish_run(run_id, "complete", {})
    return path


def shard_of(seq: str, count: int) -> int:
    """The shard of a sequence: by its digest, as ``--shard I/N`` partitions ``embed``."""
    return int.from_bytes(sequence_digest(seq)[:8], "little") % count


def write_shards(directory: Path, spec: TableSpec, recs: list[tuple[str, str]],
                 count: int, *, precision: str = "fp32") -> list[Path]:
    """``count`` shard stores of ``recs`` in ``directory``, named as a sharded run names
    them, each with an embed run record that says its shard."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        part = [(rid, seq) for rid, seq in recs if shard_of(seq, count) == index]
        path = directory / f"shard-{index:04d}-of-{count:04d}.lmdb"
        run = {"run_id": f"run-{index}", "command": "embed", "inputs": ["in.fa"],
               "precision": precision, "shard": f"{index}/{count}"}
        paths.append(write_store(path, spec, part, run=run))
    return paths


def dump(path: Path, table: str = "default") -> dict[str, list[tuple[bytes, bytes]]]:
    """Every (key, value) of the table's embeddings and ids databases, in key order."""
    with Snapshot(path) as snap:
        return {kind: list(snap.cursor(table, kind).iternext()) for kind in ("emb", "ids")}


def run_records(path: Path) -> dict[str, dict]:
    with Snapshot(path) as snap:
        return {k: json.loads(v) for k, v in snap.runs.items()}


class StopAfter(NoProgress):
    """Sets ``stop`` after ``n`` chunks of the stage whose name contains ``what``."""

    def __init__(self, stop: threading.Event, what: str, n: int):
        self.stop, self.what, self.n, self.current = stop, what, n, ""

    def start(self, what, total):
        self.current = what

    def advance(self, done, nbytes=0):
        if self.what in self.current:
            self.n -= 1
            if self.n <= 0:
                self.stop.set()
