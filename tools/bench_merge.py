#!/usr/bin/env python3
"""``gpuengine merge`` benchmark: N ESM-2 650M mean vectors (dim 1280, stored as fp16) in K
shard stores, merged into one; appends a row (system ``gpuengine-merge``) to a results file.

    python tools/bench_merge.py --vectors 1000000 --shards 8 --workdir /tmp/bm \\
        --out-row docs/benchmarks/results.jsonl [--verify] [--profile]

The shards are written once through the project's StoreWriter (random fp16 vectors, random
sequence digests, ids derived from them, one embed run record per shard saying ``I/K``, as a
sharded run writes) into ``WORKDIR/merge-shards-N-K/`` and reused by later runs (a marker file
says they are complete). Each run merges them into a fresh ``WORKDIR/merged.lmdb`` with
``merge_stores`` (what the command calls) and reports the time of each stage (id check,
vectors, ids, and with --verify the re-read), vectors/s and MB/s over the whole merge. The
shards were just written or read, so they are mostly in the page cache (a cluster's merge job
reads them from disk: see the note in the row); everything dirty is flushed (``sync``) before
the timed merge, so that the shards' writeback does not share the disk with it.
--synced-commits flushes every commit before the next (how a merge into a store with data of
its own runs) instead of the deferred flushing of a new OUT; --no-sync never flushes. --profile runs the merge under cProfile and
adds the functions that took the most time to the row (LMDB's puts and commits, the reads of
the inputs, the sort, Python per-item work).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpuengine.store import ModelIdentity, OutputSpec, StoreWriter, TableSpec  # noqa: E402
from gpuengine.store.merge import NoProgress, merge_stores  # noqa: E402
from gpuengine.store.writer import CommitRows  # noqa: E402

DIM = 1280
MEAN = OutputSpec(33, "mean")
SPEC = TableSpec(
    name="default",
    model=ModelIdentity(family="esm2", name="esm2_t33_650M_UR50D", sha256="5e" * 32,
                        num_layers=33, embed_dim=DIM, attention_heads=20, vocab_size=33),
    outputs=(MEAN,), store_dtype="float16", dim=DIM, max_residues=1022, precision="fp16")
BATCH = 20_000


def make_shards(workdir: Path, vectors: int, shards: int, seed: int) -> list[Path]:
    """The K shard stores of N vectors (made once, reused)."""
    directory = workdir / f"merge-shards-{vectors}-{shards}"
    paths = [directory / f"shard-{k:04d}-of-{shards:04d}.lmdb" for k in range(shards)]
    marker = directory / "complete.json"
    if marker.exists() and json.loads(marker.read_text()).get("seed") == seed:
        return paths
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    for k, path in enumerate(paths):
        count = vectors // shards + (k < vectors % shards)
        with StoreWriter(path, sync=False, initial_map_size=count * 4400 + (64 << 20)) as writer:
            writer.open_table(SPEC)
            run = f"bench-shard-{k}"
            writer.begin_run(run, {"command": "embed", "precision": "fp16", "inputs": ["bench"],
                                   "shard": f"{k}/{shards}"})
            for start in range(0, count, BATCH):
                n = min(BATCH, count - start)
                raw = rng.bytes(16 * n)
                digests = [raw[i:i + 16] for i in range(0, 16 * n, 16)]
                ids = [(f"UPI{d[:8].hex().upper()}",) for d in digests]
                matrix = rng.standard_normal((n, DIM), dtype=np.float32).astype(np.float16)
                writer.commit("default", [CommitRows(digests, ids, {MEAN: matrix})], run_id=run)
            writer.finish_run(run, "complete", {})
        print(f"shard {k}: {count:,} vectors written", flush=True)
    marker.write_text(json.dumps({"seed": seed, "vectors": vectors, "shards": shards,
                                  "seconds": time.perf_counter() - started}))
    return paths


class AnonMemory:
    """Peak anonymous memory of this process (RssAnon, sampled every 0.1 s): what the merge
    holds itself, without the pages of the memory-mapped stores that ru_maxrss counts."""

    def __init__(self) -> None:
        import threading

        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak_kib = max(self.peak_kib, int(line.split()[1]))
        except (OSError, ValueError):
            pass

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self._sample()
        return round(self.peak_kib / 1024)


class StageClock(NoProgress):
    """Times the merge's stages from its progress reports."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def start(self, what: str, total: int) -> None:
        self.stop()
        self._current = (what, time.perf_counter())

    def stop(self) -> None:
        if self._current is not None:
            what, began = self._current
            self.stages[what] = self.stages.get(what, 0.0) + time.perf_counter() - began
            self._current = None

    def close(self) -> None:
        self.stop()


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("data.mdb"))


def host() -> dict:
    """CPU, memory, the filesystem of the work directory, and the GPU if any (NVML)."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f"none (CPU, {os.cpu_count()} cores)"
    try:
        import pynvml

        pynvml.nvmlInit()
        gpu = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        gpu = gpu.decode() if isinstance(gpu, bytes) else gpu
    except Exception:  # no NVML, no GPU: the CPU line says it
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"gpu": gpu, "cpu": cpu, "cpus": os.cpu_count(), "memory_gib": round(mem / 2**30, 1)}


def filesystem(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout
        return out.splitlines()[1].split()[1]
    except (OSError, IndexError):
        return "unknown"


def profile_rows(profiler: cProfile.Profile, top: int = 12) -> list[str]:
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).sort_stats("tottime")
    stats.print_stats(top)
    print(stream.getvalue(), flush=True)
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in sorted(
            stats.stats.items(), key=lambda kv: -kv[1][2])[:top]:
        rows.append(f"{tottime:7.2f} s self {cumtime:7.2f} s cum {calls:>8} calls "
                    f"{Path(file).name}:{line}({name})")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpuengine-bench-merge"))
    ap.add_argument("--out-row", type=Path, required=True, help="results.jsonl to append to")
    ap.add_argument("--transaction-mb", type=float, default=256.0)
    ap.add_argument("--verify", action="store_true", help="also time merge --verify")
    ap.add_argument("--no-sync", action="store_true",
                    help="OUT never flushed (shows how much the disk costs; not durable)")
    ap.add_argument("--synced-commits", action="store_true",
                    help="flush every commit before the next (the mode of a merge into a store "
                    "with data of its own) instead of the deferred flushing of a new OUT")
    ap.add_argument("--profile", action="store_true", help="run the merge under cProfile")
    ap.add_argument("--no-read-ahead", dest="read_ahead", action="store_false",
                    help="read the inputs on the writer's thread only (the default reads "
                    "the next chunk on a second thread while a chunk is committed)")
    ap.add_argument("--keep", action="store_true", help="keep the merged store")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="")
    ap.add_argument("--commit", default=os.environ.get("GPUENGINE_COMMIT", "unknown"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    shards = make_shards(args.workdir, args.vectors, args.shards, args.seed)
    out = args.workdir / "merged.lmdb"
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # the shards' (or an earlier output's) writeback does not compete with this run
    clock = StageClock()
    memory = AnonMemory()
    profiler = cProfile.Profile() if args.profile else None
    cpu = os.times()
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    summary = merge_stores(out, shards, progress=clock, sync=not args.no_sync,
                           read_ahead=args.read_ahead, deferred=not args.synced_commits,
                           transaction_bytes=int(args.transaction_mb * (1 << 20)))
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - started
    cpu_s = sum(os.times()[:2]) - sum(cpu[:2])
    clock.close()
    peak_anon = memory.stop()
    merged = summary.tables["default"]
    assert merged["emb_added"] == args.vectors, merged
    verify_s = None
    if args.verify:
        verify_clock = StageClock()
        again = merge_stores(out, shards, verify=True, progress=verify_clock)
        verify_clock.close()
        assert again.verify.ok, again.verify.examples
        verify_s = verify_clock.stages.get("verifying")
    nbytes = summary.bytes_read
    row = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "commit": args.commit, **host(), "n_gpus": 0,
           "command": "python tools/bench_merge.py " + " ".join(sys.argv[1:]),
           "system": "gpuengine-merge", "model": "esm2-650M", "workload":
           f"merge {args.shards} shards, {args.vectors:,} mean vectors dim {DIM} float16",
           "vectors": args.vectors, "shards": args.shards, "vector_bytes": DIM * 2,
           "vectors_per_s": args.vectors / wall, "mb_per_s": nbytes / wall / 1e6,
           "wall_s": wall, "cpu_s": round(cpu_s, 3),
           "merge_vectors_per_s": summary.vectors_per_second,
           "stage_seconds": {k: round(v, 3) for k, v in clock.stages.items()},
           "verify_s": verify_s,
           "verify_vectors_per_s": args.vectors / verify_s if verify_s else None,
           "transactions": summary.transactions, "transaction_mb": args.transaction_mb,
           "sync": not args.no_sync, "read_ahead": args.read_ahead,
           "flush": ("never" if args.no_sync else "every commit" if args.synced_commits
                     else "deferred"),
           "filesystem": filesystem(args.workdir),
           "input_bytes": du(args.workdir / f"merge-shards-{args.vectors}-{args.shards}"),
           "output_bytes": du(out), "peak_anon_mib": peak_anon,
           "peak_rss_mib_with_mapped_stores": round(
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "note": args.note or "shards in the page cache (written or read just before)"}
    if profiler:
        row["profile"] = profile_rows(profiler)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    with open(args.out_row, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1), flush=True)


if __name__ == "__main__":
    main()
