#!/usr/bin/env python3
"""What LMDB alone sustains for the store's writes: ``--puts`` values of ``--value-bytes`` under
random 17-byte keys (a prefix byte and 16 random bytes, as the store's embedding keys), sorted
and written with one cursor ``putmulti`` per transaction of ``--per-txn``, fsync on each commit
unless ``--no-sync``. No gpuengine code runs: it says what the disk and LMDB's page layout allow.

    python tools/bench_lmdb_values.py --value-bytes 3072 --puts 1000000 --per-txn 10000 --out r.jsonl
    python tools/bench_lmdb_values.py --value-bytes 1536 --puts 1000000 --per-txn 10000 --out r.jsonl

A 768-dim float32 vector is 3072 bytes, a float16 one 1536: LMDB keeps a value of up to about
2 KB inside its leaf page (two to a 4 KB page, so inserts at random keys rewrite and split
leaves), a larger one in overflow pages of its own (leaves hold only keys). One row (system
``lmdb``): ``puts_per_s``, ``written_gb`` (this process's write_bytes from /proc: what it gave
the page cache, rewrites included), ``written_per_value`` (its bytes a value), ``disk_written_gb``
(the store's device, /proc/diskstats, after a final sync), ``file_gb``.

``--layout blocks`` measures a layout the store does not have (a proposal): each transaction's
values packed ``--per-block`` to a value, under increasing 8-byte block numbers (appended), and
the random keys mapped to a 12-byte (block, slot) locator kept inside the leaves:

    python tools/bench_lmdb_values.py --layout blocks --per-block 21 --puts 1000000 --per-txn 32768 --out r.jsonl

``--layout generations`` measures another (a proposal): the values as the store writes them, but
in a new LMDB database every ``--generation-size`` values, so each transaction's random keys
land in a tree of at most that many entries. ``--segment N`` adds ``segments`` to the row: per
N values, the rate and the disk's bytes a value (sectors written, no final sync) while the
table grows — how a run slows as its store fills:

    python tools/bench_lmdb_values.py --puts 6000000 --per-txn 42000 --segment 500000 --out r.jsonl
    python tools/bench_lmdb_values.py --layout generations --generation-size 1000000 --puts 6000000 --per-txn 42000 --segment 500000 --out r.jsonl
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import DiskWrites, ResultsLog, add_commit_option  # noqa: E402


def _process_written() -> int:
    with open("/proc/self/io") as fh:
        return int(dict(line.split(": ") for line in fh.read().splitlines())["write_bytes"])


def main() -> None:
    import lmdb

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--value-bytes", type=int, default=3072)
    ap.add_argument("--puts", type=int, default=1_000_000)
    ap.add_argument("--per-txn", type=int, default=10_000)
    ap.add_argument("--no-sync", action="store_true")
    ap.add_argument("--layout", choices=["values", "blocks", "generations"], default="values",
                    help="values: one value a key, as the store writes them; blocks: values "
                         "packed --per-block to an appended block, keys mapped to (block, slot); "
                         "generations: as values, in a new database every --generation-size")
    ap.add_argument("--per-block", type=int, default=21,
                    help="values a block holds (--layout blocks; 21 × 3072 B fill 16 pages)")
    ap.add_argument("--generation-size", type=int, default=1_000_000,
                    help="values a database takes before the next one (--layout generations)")
    ap.add_argument("--segment", type=int, default=0,
                    help="report the rate and disk bytes a value per this many values (0: none)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpuengine-bench"))
    ap.add_argument("--out", required=True)
    add_commit_option(ap)
    args = ap.parse_args()
    path = args.workdir / "lmdb-values"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    generations = args.layout == "generations"
    if generations and args.generation_size % args.per_txn:
        ap.error("--generation-size must be a multiple of --per-txn")
    env = lmdb.open(str(path), map_size=1 << 40, sync=not args.no_sync,
                    max_dbs=2 + (-(-args.puts // args.generation_size) if generations else 0))
    db, blocks_db = env.open_db(b"e"), env.open_db(b"b")
    rng = np.random.default_rng(0)
    value = bytes(args.value_bytes)
    disk, written = DiskWrites(path), _process_written()
    next_block = 0
    segments: list[dict] = []
    started = time.perf_counter()
    mark = (0, started, disk.written())
    for at in range(0, args.puts, args.per_txn):
        n = min(args.per_txn, args.puts - at)
        if generations and at and at % args.generation_size == 0:
            db = env.open_db(b"e%d" % (at // args.generation_size))
        keys = sorted(b"\x01" + k for k in np.frombuffer(rng.bytes(16 * n), "V16").tolist())
        with env.begin(write=True) as txn:
            if args.layout != "blocks":
                txn.cursor(db=db).putmulti([(k, value) for k in keys])
            else:
                count = -(-n // args.per_block)
                numbers = range(next_block, next_block + count)
                txn.cursor(db=blocks_db).putmulti(
                    [(b.to_bytes(8, "big"), value * min(args.per_block, n - i * args.per_block))
                     for i, b in enumerate(numbers)], append=True)
                txn.cursor(db=db).putmulti(
                    [(k, (next_block + i // args.per_block).to_bytes(8, "big")
                      + (i % args.per_block).to_bytes(4, "big")) for i, k in enumerate(keys)])
                next_block += count
        if args.segment and (at + n) // args.segment > mark[0] // args.segment:
            now, bytes_now = time.perf_counter(), disk.written()
            segments.append({"at": at + n, "puts_per_s": round((at + n - mark[0]) / (now - mark[1])),
                             "disk_written_per_value": None if bytes_now is None else
                             round((bytes_now - mark[2]) / (at + n - mark[0]))})
            mark = (at + n, now, bytes_now)
    seconds = time.perf_counter() - started
    env.sync(True)
    env.close()
    disk_written = disk.written()
    process_written = _process_written() - written
    rec = ResultsLog(args.out, args.commit, __file__).append(
        system="lmdb", value_bytes=args.value_bytes, puts=args.puts, per_txn=args.per_txn,
        sync=not args.no_sync, layout=args.layout,
        per_block=args.per_block if args.layout == "blocks" else None,
        generation_size=args.generation_size if generations else None,
        segments=segments or None,
        puts_per_s=args.puts / seconds, seconds=seconds, written_gb=process_written / 1e9,
        written_per_value=round(process_written / args.puts),
        disk_written_gb=None if disk_written is None else disk_written / 1e9,
        file_gb=os.path.getsize(path / "data.mdb") / 1e9)
    shutil.rmtree(path, ignore_errors=True)
    print(rec)


if __name__ == "__main__":
    main()
