#!/usr/bin/env python3
"""The fixed cost of one shard of a cluster run: every ``--shard I/N`` task reads the whole
input — a validation pass (parse, check, count its shard's records) and a reading pass (parse,
hash, keep its shard's records, tokenize those) — whatever N is. Times both passes of shard 0
of ``--shards`` over a FASTA of ``--records`` proteins (no model, no GPU) and appends a row
(system ``gpuengine-shard-scan``, ``records_per_s`` over both passes) to a results file.

    python tools/bench_shard_scan.py --records 2000000 --shards 16 --workdir /tmp/scan \\
        --out-row docs/benchmarks/results.jsonl [--lengths short|uniprot]

``short``: 30–70 residues (proteins of 150-bp reads); ``uniprot``: 50–800 (mean ≈ 400).
The FASTA is written once into WORKDIR and reused. docs/cluster.md turns the rate into the
per-task minutes of a 100 M-record run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import ResultsLog, add_commit_option  # noqa: E402

from gpuengine.inputs import LOOKUP_CHUNK, InThreadInput, validated_fasta  # noqa: E402
from gpuengine.shards import Shard  # noqa: E402
from gpuengine.tokenization import EsmTokenizer  # noqa: E402

RESIDUES = np.frombuffer(b"LAGVSERTIDPKQNFYMHWC", np.uint8)
LENGTHS = {"short": (30, 71), "uniprot": (50, 801)}


def write_fasta(path: Path, records: int, lengths: str, seed: int = 0) -> Path:
    """``records`` random proteins (made once; a complete file is renamed into place)."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    low, high = LENGTHS[lengths]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        for start in range(0, records, 100_000):
            n = min(100_000, records - start)
            sizes = rng.integers(low, high, n)
            letters = RESIDUES[rng.integers(0, len(RESIDUES), int(sizes.sum()))].tobytes()
            ends = np.cumsum(sizes)
            handle.write("".join(f">p{start + i}\n{letters[e - s:e].decode()}\n"
                                 for i, (s, e) in enumerate(zip(sizes, ends))))
    os.replace(tmp, path)
    return path


def scan(fasta: Path, shards: int) -> dict:
    """Both passes of shard 0 of ``shards``, timed."""
    tokenizer, shard = EsmTokenizer(), Shard(0, shards)
    started = time.perf_counter()
    source = validated_fasta([fasta], tokenizer.alphabet, skip_invalid=False, stored=None,
                             shard=shard, max_residues=1022)
    validated = time.perf_counter()
    reader = InThreadInput(source.iterate, tokenizer, 1022, LOOKUP_CHUNK, shard=shard)
    kept = sum(len(chunk.ids) for chunk in reader.chunks())
    done = time.perf_counter()
    records = source.counts()["records_read"]
    assert kept == source.count, (kept, source.count)
    return {"records": records, "shard_records": kept,
            "validate_s": round(validated - started, 3), "read_s": round(done - validated, 3),
            "validate_records_per_s": records / (validated - started),
            "read_records_per_s": records / (done - validated),
            "records_per_s": records / (done - started), "wall_s": done - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=2_000_000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--lengths", choices=sorted(LENGTHS), default="short")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gpuengine-scan"))
    parser.add_argument("--out-row", type=Path, help="append the row to this results file")
    parser.add_argument("--note", default="")
    add_commit_option(parser)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    fasta = write_fasta(args.workdir / f"proteins-{args.lengths}-{args.records}.fa",
                        args.records, args.lengths)
    measured = scan(fasta, args.shards)
    log = ResultsLog(args.out_row or Path(os.devnull), args.commit, __file__, n_gpus=0,
                     system="gpuengine-shard-scan", model="-",
                     workload=f"shard 0/{args.shards} of {args.records:,} {args.lengths} "
                              "proteins: validation + reading passes",
                     cpus=os.cpu_count(), load_average=os.getloadavg()[0])
    if args.out_row:
        log.append(**measured, note=args.note)
    print(f"{measured['records']:,} records, shard 0/{args.shards} keeps "
          f"{measured['shard_records']:,}: validation {measured['validate_s']:.1f} s "
          f"({measured['validate_records_per_s']:,.0f}/s), reading {measured['read_s']:.1f} s "
          f"({measured['read_records_per_s']:,.0f}/s); {measured['records_per_s']:,.0f} "
          f"records/s over both; 100 M records ≈ {1e8 / measured['records_per_s'] / 60:.0f} min")


if __name__ == "__main__":
    main()
