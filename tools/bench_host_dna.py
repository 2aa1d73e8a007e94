#!/usr/bin/env python3
"""Host-pipeline capacity for DNABERT-S: `gpuengine embed` on synthetic 150-bp reads with the GPU
step replaced by a no-op (FASTA → validate → BPE tokenize → plan → schedule → commit of 768-dim
vectors into LMDB). Runs on any machine; the DNA counterpart of ``bench_esm.py --systems host``.

    python tools/bench_host_dna.py --reads 400000 --out results.jsonl
    python tools/bench_host_dna.py --reads 2000000 --devices 8 --curve 2,4,8,16 --out r.jsonl

Each row carries ``devices`` (no-op devices), ``cores`` (cores the run could use) and
``input_processes`` (children reading, hashing and tokenizing the input) and
``writer_process`` (``GPUENGINE_WRITER_PROCESS``: auto, 1 or 0; auto writes the store from a
child process for inputs of 20 000 records or more) and ``writers`` (the store writer
processes, each writing its own part store: ``--writers N``, or auto as ``gpuengine embed``),
and, where the workdir is on a block device (Linux), ``disk_written_per_seq`` and
``disk_mb_per_s``: what the disk wrote during the run (``/proc/diskstats``) per read, and per
second of the embedding phase.

    python tools/bench_host_dna.py --reads 2000000 --devices 8 --writers 4 --curve 2,4,8,16 --out r.jsonl

``--budget`` sets each no-op device's token budget (row field ``budget``; default the CPU
device's 4096, about 120 reads a batch; 65536, a GPU's default, is about 1900).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (DiskWrites, ResultsLog, add_commit_option, add_host_options,  # noqa: E402
                          limit_cores, name_native_threads, run_curve, run_e2e, write_reads_fasta, writers_option)
from gpuengine.synthetic import write_dnabert_s  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reads", type=int, default=400_000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpuengine-bench"))
    ap.add_argument("--budget", type=int, default=None,
                    help="token budget of each no-op device (default: the CPU device default, "
                         "4096; a GPU's default is 65536, as bench_esm.py --systems host uses: "
                         "batches 16 times larger, so the per-batch work is 16 times rarer)")
    ap.add_argument("--store-dtype", default="float32", choices=["float32", "float16"],
                    help="as embed --store-dtype (row field store_dtype; default float32, "
                         "embed's default)")
    add_commit_option(ap)
    add_host_options(ap)
    args = ap.parse_args()
    if args.curve:
        return run_curve(__file__, args.curve)
    cores = limit_cores(args.cores)
    name_native_threads()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = args.workdir / "DNABERT-S_host"  # one layer: the no-op runner never runs it
    if not model.exists():
        write_dnabert_s(model, seed=0, num_layers=1)
    fasta = args.workdir / f"host-dna150-{args.reads}.fa"
    if not fasta.exists():
        rng = np.random.default_rng(7)
        bases = np.frombuffer(b"ACGT", dtype=np.uint8)
        write_reads_fasta(fasta, args.reads, lambda n: bases[rng.integers(0, 4, (n, 150))])
    from gpuengine.budget import DEFAULT_CPU_MAX_TOKENS
    from gpuengine.config import environment
    from gpuengine.input_workers import process_count

    disk = DiskWrites(args.workdir)
    summary = run_e2e(model, fasta, args.budget, args.workdir, noop_dim=768,
                      devices=args.devices, writers=writers_option(args.writers),
                      store_dtype=args.store_dtype)
    rec = ResultsLog(args.out, args.commit, __file__).append(
        model="dnabert-s", workload="dna150", system="gpuengine-host", precision="none",
        tokens_per_s=summary.tokens / summary.embed_seconds,
        sequences_per_s=summary.embedded / summary.embed_seconds,
        wall_s=summary.wall_seconds, embed_s=summary.embed_seconds,
        validate_s=summary.validate_seconds,
        sequences=summary.embedded, workdir=str(args.workdir),
        devices=args.devices, cores=cores, budget=args.budget or DEFAULT_CPU_MAX_TOKENS,
        input_processes=process_count(environment().input_processes),
        writer_process=os.environ.get("GPUENGINE_WRITER_PROCESS", "auto"),
        writers=summary.writers, writers_option=args.writers, store_dtype=args.store_dtype,
        commit_transactions=summary.commit_transactions,
        commit_seconds=summary.commit_seconds,
        commit_wait_seconds=summary.commit_wait_seconds,
        store_bound=summary.to_json()["store_bound"],
        main_cpu_us_per_seq=1e6 * summary.main_cpu_seconds / max(1, summary.embedded),
        **disk.fields(summary.embedded, summary.embed_seconds),
        note="GPU step replaced by a no-op; parse+validate+BPE tokenize+plan+schedule+commit "
             "(tokens_per_s: model tokens, CLS/SEP included; the rates are of the embedding "
             "phase, embed_s; validate_s: the first pass over the input before it)")
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
