#!/usr/bin/env python3
"""What the store writer processes sustain alone: commit groups of pooled vectors, made
beforehand (digests, ids, embedding keys and a (rows, dim) array, as the engine hands them
on), handed to ``--writers`` writer processes (one store, or part stores: ``embed --writers``)
as fast as they take them. Nothing else runs: no input, no planner, no devices.

    python tools/bench_writer.py --dim 768 --vectors 400000 --writers 1,2 --out results.jsonl
    python tools/bench_writer.py --dim 1280 --vectors 200000 --writers 1,2,4 --out results.jsonl

One row per writer count (system ``gpuengine-writer``): ``vectors_per_s``, ``mb_per_s`` (the
vectors' bytes), ``frames_per_s`` (GRUP frames the engine's side sent: one per group and
part), ``transactions`` (groups the children merged into one commit when they lagged), and
``engine_cpu_us_per_vector`` (this process's CPU time per vector: splitting, encoding frames,
writing pipes, reading acknowledgements; the children's own time not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import ResultsLog, add_commit_option, limit_cores  # noqa: E402
from gpuengine.store.commit_group import CommitRows  # noqa: E402
from gpuengine.store.parts import part_label, part_paths  # noqa: E402
from gpuengine.store.schema import (ModelIdentity, OutputSpec, TableSpec,  # noqa: E402
                                    embedding_keys_from_prefix)
from gpuengine.store.writer import StoreWriter  # noqa: E402
from gpuengine.writer_parts import PartedCommitter  # noqa: E402
from gpuengine.writer_process import CommitterProcess  # noqa: E402


class _Ledger:
    """The ledger's one call the writers make (the run's ledger has nothing to release here)."""

    def committed(self, digests) -> None:
        pass


def _spec(dim: int) -> TableSpec:
    model = ModelIdentity(family="esm2", name="bench", sha256="0" * 64, num_layers=1,
                          embed_dim=dim, attention_heads=1, vocab_size=33)
    return TableSpec(name="default", model=model, outputs=(OutputSpec(1, "mean"),),
                     store_dtype="float32", dim=dim, max_residues=None, precision="fp32")


def _groups(spec: TableSpec, vectors: int, group: int, seed: int) -> list[CommitRows]:
    rng = np.random.default_rng(seed)
    output = spec.outputs[0]
    prefix = spec.embedding_key_prefix(output)
    block = rng.standard_normal((group, spec.dim), dtype=np.float32)
    raw = rng.integers(0, 256, (vectors, 16), dtype=np.uint8).tobytes()
    out = []
    for start in range(0, vectors, group):
        n = min(group, vectors - start)
        digests = [raw[16 * i:16 * i + 16] for i in range(start, start + n)]
        ids = [(f"read{i}",) for i in range(start, start + n)]
        keys = (embedding_keys_from_prefix(prefix, digests),)
        out.append(CommitRows(digests, ids, {output: block[:n]}, keys))
    return out


def measure(workdir: Path, dim: int, vectors: int, group: int, writers: int) -> dict:
    spec = _spec(dim)
    store = workdir / f"writer-bench-{dim}.lmdb"
    shutil.rmtree(store, ignore_errors=True)
    groups = _groups(spec, vectors, group, seed=writers)
    paths = part_paths(store, writers)
    if writers > 1:
        store.mkdir(parents=True)
    sizes = []
    for index, path in enumerate(paths):
        with StoreWriter(path, part=None if writers == 1 else part_label(index, writers)) as w:
            w.open_table(spec)
            w.begin_run("bench", {"command": "bench"})
            sizes.append(w.map_size)
    if writers == 1:
        committer = CommitterProcess(paths[0], spec, "bench", _Ledger(), map_size=sizes[0])
    else:
        committer = PartedCommitter(paths, spec, "bench", _Ledger(), map_sizes=sizes)
    committer.start()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    try:
        for rows in groups:
            committer.put([rows])
    finally:
        committer.finish()
    seconds = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    if committer.error is not None:
        raise committer.error
    counts = committer.snapshot()
    assert counts.sequences == vectors, (counts.sequences, vectors)
    frames = len(groups) if writers == 1 else sum(committer.sent)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    size = sum(os.path.getsize(p / "data.mdb") for p in paths)
    shutil.rmtree(store, ignore_errors=True)
    return {"vectors_per_s": vectors / seconds, "mb_per_s": vectors * dim * 4 / seconds / 1e6,
            "frames_per_s": frames / seconds, "seconds": seconds,
            "transactions": counts.transactions, "frames": frames,
            "engine_cpu_us_per_vector": 1e6 * cpu / vectors, "store_bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=768, help="768: DNABERT-S; 1280: ESM-2 650M")
    ap.add_argument("--vectors", type=int, default=400_000)
    ap.add_argument("--group", type=int, default=8192,
                    help="vectors per group (the engine's commit_every; a group of more than "
                         "32 MB, e.g. 32768 768-d vectors, crosses the pipe slower than a "
                         "run's groups do: each frame is read into a fresh buffer)")
    ap.add_argument("--writers", default="1,2", help="comma-separated writer counts")
    ap.add_argument("--cores", type=int, default=None,
                    help="cores this process and the writers may use (default: all)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpuengine-bench"))
    add_commit_option(ap)
    args = ap.parse_args()
    cores = limit_cores(args.cores)
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = ResultsLog(args.out, args.commit, __file__)
    model = {768: "dnabert-s", 1280: "esm2_t33_650M_UR50D"}.get(args.dim, f"dim{args.dim}")
    for writers in [int(w) for w in args.writers.split(",") if w.strip()]:
        row = measure(args.workdir, args.dim, args.vectors, args.group, writers)
        rec = log.append(model=model, workload=f"vectors-{args.dim}d-fp32",
                         system="gpuengine-writer", precision="none", writers=writers,
                         cores=cores, dim=args.dim, sequences=args.vectors, group=args.group,
                         sequences_per_s=row["vectors_per_s"], workdir=str(args.workdir), **row,
                         note="store writer processes alone: pre-made commit groups of pooled "
                              "fp32 vectors, committed with fsync")
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
