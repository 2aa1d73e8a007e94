#!/usr/bin/env python3
"""Plots and markdown tables from the benchmark log ``docs/benchmarks/results.jsonl``.

    .venv/bin/pip install matplotlib          # dev-only tool: matplotlib is NOT a gpuengine dependency
    .venv/bin/python tools/plot_benchmarks.py             # writes the PNGs
    .venv/bin/python tools/plot_benchmarks.py --markdown  # ... and prints the tables of docs/benchmarks.md

Writes
  docs/benchmarks/throughput.png    residue tokens/s by system for each (model, workload), from the
                                    latest record (by date) of each (model, workload, system); the
                                    gpuengine bars carry their % of the GEMM ceiling (burst), bars
                                    from an older run than the newest carry that run's commit;
                                    fp8 bars are the run default's GEMMs (tools/bench_fp8.py), and
                                    lines mark the ceilings of the bf16 and e4m3 GEMMs sustained
                                    for >= 3 s where a bench_fp8 run measured them
  docs/benchmarks/by_gpu_count.png  tokens/s against the number of GPUs, per model and system, for one
                                    workload (--gpu-workload), with an "ideal linear" line from the
                                    1-GPU point to 8 GPUs
  docs/benchmarks/host_cores.png    host-pipeline sequences/s against cores used (bench --curve rows
                                    of a GPU machine, not under a profiler), per model and no-op
                                    device count (newest commit; the one before dashed), with goals
  docs/benchmarks/table_growth.png  LMDB alone (bench_lmdb_values --segment rows of a GPU machine,
                                    newest of each layout): values/s and the disk's bytes a value
                                    against the entries the table holds

Every number in docs/benchmarks.md comes from ``--markdown``; nothing there is typed by hand.
Only the standard library and matplotlib (Agg backend) are used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmark_page.figures import (plot_by_gpu_count, plot_host_cores, plot_table_growth,
                                    plot_throughput)
from benchmark_page.page import markdown
from benchmark_page.records import lmdb_growth_rows, load

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "benchmarks"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=BENCH / "results.jsonl")
    ap.add_argument("--out-dir", type=Path, default=BENCH)
    ap.add_argument("--gpu-workload", default="virnucpro150", help="workload of the by-GPU-count plot")
    ap.add_argument("--profile", type=Path, nargs="*",
                    default=sorted(BENCH.glob("profile-*.txt"), key=lambda p: p.stat().st_mtime)[-2:],
                    help="kernel tables to summarise (default: the two newest profile-*.txt)")
    ap.add_argument("--markdown", action="store_true", help="print the tables of docs/benchmarks.md")
    args = ap.parse_args()
    recs = load(args.results)
    plot_throughput(recs, args.out_dir / "throughput.png")
    plot_by_gpu_count(recs, args.out_dir / "by_gpu_count.png", args.gpu_workload)
    plot_host_cores(recs, args.out_dir / "host_cores.png")
    plot_table_growth(lmdb_growth_rows(args.results), args.out_dir / "table_growth.png")
    print(f"wrote {args.out_dir / 'throughput.png'}, {args.out_dir / 'by_gpu_count.png'}, "
          f"{args.out_dir / 'host_cores.png'} and {args.out_dir / 'table_growth.png'}", flush=True)
    if args.markdown:
        print(markdown(recs, args.profile))


if __name__ == "__main__":
    main()
