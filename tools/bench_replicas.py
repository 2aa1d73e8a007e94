#!/usr/bin/env python3
"""``--replicas-per-gpu R`` on one GPU: R = 1, 2, 4 for DNABERT-S (dna150), ESM-2 650M and 8M
(virnucpro150), random weights of the real shapes, all in one run (same GPU, same commit).

    python tools/bench_replicas.py --out results.jsonl                 # the GPU measurement
    python tools/bench_replicas.py --quick --out /tmp/rows.jsonl       # CPU smoke run, seconds

For each model and R, two rows (``replicas_per_gpu`` = R):

``gpuengine-replicas-e2e``
    ``gpuengine embed --replicas-per-gpu R`` in-process: FASTA → validate → plan → R replicas
    → LMDB commit, into a fresh store on the work directory's disk; what a user sees (its
    replicas built and warmed up by a short run before, as a daemon's are).
``gpuengine-replicas``
    the same R replicas (the engine's own, kept in a :class:`~gpuengine.replicas.ReplicaPool`:
    shared weights, memory shares, warmed up) fed pre-tokenized items by one
    scheduler, no input parsing or store: what R changes on the GPU itself.

Each row has the per-replica ``devices`` rows (share of the tokens, busy fraction, budget)
and the rate relative to R = 1 (``speedup_vs_r1``). The default stays R = 1 unless R = 2
wins here (issue 16).

``--quick``: the tiny test-sized models on the CPU and a few thousand sequences (R on the CPU
splits its threads), for checking the tool itself.
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import ResultsLog, add_commit_option, write_reads_fasta  # noqa: E402
from gpuengine.packing import WorkItem  # noqa: E402
from gpuengine.replicas import ReplicaPool  # noqa: E402
from gpuengine.scheduler import Scheduler  # noqa: E402
from gpuengine.store.codec import sequence_digest  # noqa: E402
from gpuengine.synthetic import (ESM2_SHAPES, random_esm2_state, write_dnabert_s,  # noqa: E402
                                 write_fair_esm_checkpoint_from_state)
from gpuengine.worker import DeviceWorker, WorkerExit, device_rows  # noqa: E402

WARM_SEQUENCES = 512
"""A short run per R before the timed ones: builds, warms up and compiles the replicas."""
AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
BASES = np.frombuffer(b"ACGT", dtype=np.uint8)

MODELS = {
    # name: (workload, sequences on a GPU, sequences with --quick)
    "dnabert-s": ("dna150", 120_000, 400),
    "esm2-650M": ("virnucpro150", 24_000, 400),
    "esm2-8M": ("virnucpro150", 200_000, 400),
}


# -- inputs ---------------------------------------------------------------------------------------

def model_path(name: str, workdir: Path, quick: bool) -> Path:
    """The random-weight checkpoint of ``name`` (written once into ``workdir``); ``quick``:
    a tiny one of the same family."""
    if name == "dnabert-s":
        directory = workdir / ("DNABERT-S_tiny" if quick else "DNABERT-S_random")
        if not (directory / "config.json").exists():
            shape = dict(num_layers=2, embed_dim=64, heads=4, intermediate=128, vocab=512) \
                if quick else {}
            write_dnabert_s(directory, seed=0, **shape)
        return directory
    short = name.split("-", 1)[1]
    full = {"650M": "esm2_t33_650M_UR50D", "8M": "esm2_t6_8M_UR50D"}[short]
    layers, dim, heads = (2, 32, 4) if quick else ESM2_SHAPES[full]
    path = workdir / (f"esm2_tiny_{short}.pt" if quick else f"{full}.pt")
    if not path.exists():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        state = random_esm2_state(layers, dim, heads, seed=0, dtype=torch.float16, device=device)
        write_fair_esm_checkpoint_from_state(path, {k: v.cpu() for k, v in state.items()},
                                             layers, dim, heads)
    return path


def workload(name: str, count: int, workdir: Path) -> tuple[Path, list[str]]:
    """(FASTA path, sequences): ``dna150`` 150-bp reads, ``virnucpro150`` 48-50 aa proteins."""
    rng = np.random.default_rng(7)
    if name == "dna150":
        rows = BASES[rng.integers(0, 4, (count, 150))]
    else:
        lengths = rng.integers(48, 51, count)
        rows = [AMINO[rng.integers(0, 20, n)] for n in lengths]
    seqs = [row.tobytes().decode() for row in rows]
    path = workdir / f"replicas-{name}-{count}.fa"
    if not path.exists():
        it = iter(seqs)
        write_reads_fasta(path, count, lambda n: [np.frombuffer(next(it).encode(), np.uint8)
                                                  for _ in range(n)])
    return path, seqs


def work_items(model: Path, seqs: list[str]) -> list[WorkItem]:
    """The sequences tokenized as the engine tokenizes them (the model's own tokenizer)."""
    from gpuengine.models.registry import family
    from gpuengine.models.sources import resolve

    source = resolve(str(model), allow_download=False)
    tokenizer = family(source.family).tokenizer(source)
    batch = getattr(tokenizer, "encode_batch", None)
    tokens = batch(seqs) if batch is not None else [tokenizer.encode(s) for s in seqs]
    return [WorkItem(sequence_digest(s), t, len(s)) for s, t in zip(seqs, tokens)]


# -- measurements ---------------------------------------------------------------------------------

def run_e2e(model: Path, fasta: Path, replicas: int, workdir: Path, devices: str, pool):
    """``gpuengine embed --replicas-per-gpu R`` in-process into a fresh store (removed after),
    building its replicas into ``pool`` or reusing the ones there; returns the summary."""
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed

    store = workdir / f"replicas-{replicas}.lmdb"
    shutil.rmtree(store, ignore_errors=True)
    config = EmbedConfig(inputs=(fasta,), model=str(model), out=store, devices=devices,
                         replicas_per_gpu=replicas, allow_download=False)
    try:
        return run_embed(config, replicas=pool)
    finally:
        shutil.rmtree(store, ignore_errors=True)


def drive_replicas(pool, items: list[WorkItem]) -> dict:
    """The pool's replicas (one device group) fed ``items`` by one closed scheduler, a
    worker thread each, as the engine runs them; out-of-memory splits are handled as the
    engine does. Returns tokens, residues, sequences, seconds and the per-replica rows."""
    replicas = [r for group in pool._replicas.values() for r in group]
    scheduler = Scheduler()
    scheduler.submit(items)
    scheduler.close()
    outbox, halt = queue.Queue(), threading.Event()
    workers = [DeviceWorker(i, r.runner, r.budget, scheduler, outbox, halt, name=r.name or None)
               for i, r in enumerate(replicas)]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    tokens = residues = sequences = 0
    running = len(workers)
    while running:
        message = outbox.get()
        if isinstance(message, WorkerExit):
            running -= 1
            if message.error is not None:
                halt.set()
                raise message.error
            continue
        if message.kind == "oom":
            scheduler.out_of_memory(message.batch.batch_id)
            continue
        if message.kind != "ok":
            halt.set()
            raise RuntimeError(f"replica {message.device} failed: {message.error}")
        scheduler.complete(message.batch.batch_id)
        tokens += message.batch.n_tokens
        residues += sum(i.residues for i in message.batch.items)
        sequences += len(message.batch.items)
    seconds = time.perf_counter() - start
    for worker in workers:
        worker.join()
    return {"tokens": tokens, "residues": residues, "sequences": sequences,
            "seconds": seconds, "devices": device_rows(workers, seconds)}


def _rates(tokens: int, residues: int, sequences: int, seconds: float) -> dict:
    return {"tokens_per_s": tokens / seconds, "residues_per_s": residues / seconds,
            "sequences_per_s": sequences / seconds, "seconds": seconds,
            "sequences": sequences}


def model_label(name: str, quick: bool) -> str:
    """The ``model`` of a row: what ran (``--quick`` runs a tiny model of the family, not the
    one it stands in for)."""
    return f"tiny stand-in for {name}" if quick else name


def bench_model(name: str, args, log: ResultsLog) -> list[dict]:
    """R = each of ``args.replicas`` for one model: its e2e row and its device row."""
    workload_name, count, quick_count = MODELS[name]
    count = args.sequences or (quick_count if args.quick else count)
    model = model_path(name, args.workdir, args.quick)
    fasta, seqs = workload(workload_name, count, args.workdir)
    items = work_items(model, seqs) if "gpuengine-replicas" in args.systems else []
    devices = "cpu" if args.quick else "0"
    warm, _ = workload(workload_name, min(WARM_SEQUENCES, count), args.workdir)
    rows, base = [], {}
    for replicas in args.replicas:
        pool = ReplicaPool()
        try:  # the replicas built, warmed up and compiled by a short run; then the timed ones
            run_e2e(model, warm, replicas, args.workdir, devices, pool)
            precision = next(r.runner.precision for g in pool._replicas.values() for r in g)
            common = dict(model=model_label(name, args.quick), workload=workload_name, replicas_per_gpu=replicas,
                          precision=precision)
            if "gpuengine-replicas-e2e" in args.systems:
                summary = run_e2e(model, fasta, replicas, args.workdir, devices, pool)
                rate = _rates(summary.tokens, summary.residues, summary.embedded,
                              summary.embed_seconds)
                rows.append(_emit(log, base, common, "gpuengine-replicas-e2e", rate,
                                  wall_s=summary.wall_seconds, devices=summary.devices,
                                  exit_code=summary.exit_code))
            if "gpuengine-replicas" in args.systems:
                for _ in range(args.repeats):
                    result = drive_replicas(pool, items)
                    rate = _rates(result["tokens"], result["residues"], result["sequences"],
                                  result["seconds"])
                    rows.append(_emit(log, base, common, "gpuengine-replicas", rate,
                                      devices=result["devices"]))
        finally:
            pool.clear()
            del pool
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def _emit(log: ResultsLog, base: dict, common: dict, system: str, rate: dict, **extra) -> dict:
    """Append one row; ``speedup_vs_r1``: its sequences/s over the first R's (R = 1)."""
    key = (common["model"], system)
    base.setdefault(key, rate["sequences_per_s"])
    budgets = [d.get("budget_tokens") for d in extra.get("devices", [])]
    row = log.append(**common, system=system, **rate,
                     speedup_vs_r1=rate["sequences_per_s"] / base[key] if base[key] else None,
                     budget_tokens=budgets, **extra)
    print(json.dumps({k: row[k] for k in ("model", "system", "replicas_per_gpu",
                                          "sequences_per_s", "speedup_vs_r1")}), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--replicas", default="1,2,4", help="R values (the first is the baseline)")
    ap.add_argument("--systems", default="gpuengine-replicas-e2e,gpuengine-replicas")
    ap.add_argument("--sequences", type=int, default=None,
                    help="sequences per model (default: a few seconds' worth on one H200)")
    ap.add_argument("--repeats", type=int, default=1, help="device-only passes per R")
    ap.add_argument("--quick", action="store_true",
                    help="tiny models on the CPU, a few thousand sequences (checks the tool)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpuengine-bench"))
    add_commit_option(ap)
    args = ap.parse_args()
    args.replicas = [int(r) for r in args.replicas.split(",")]
    args.systems = args.systems.split(",")
    if not args.quick and not torch.cuda.is_available():
        raise SystemExit("tools/bench_replicas.py needs a CUDA GPU (or --quick for the CPU)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = ResultsLog(args.out, args.commit, __file__, quick=args.quick)
    rows = []
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
        rows += bench_model(name, args, log)
    print("\n# model, system: sequences/s by R (speed-up over R = 1)")
    for name in args.models.split(","):
        label = model_label(name, args.quick)
        for system in args.systems:
            cells = [f"R={r['replicas_per_gpu']}: {r['sequences_per_s']:,.0f} "
                     f"({r['speedup_vs_r1']:.2f}x)" for r in rows
                     if r["model"] == label and r["system"] == system]
            print(f"{label:10s} {system:14s} " + "  ".join(cells))


if __name__ == "__main__":
    main()
