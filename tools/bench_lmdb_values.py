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
    ap.add_argument("--layout", choices=["values", "blocks"], default="values",
                    help="values: one value a key, as the store writes them; blocks: values "
                         "packed --per-block to an appended block, keys mapped to (block, slot)")
    ap.add_argument("--per-block", type=int, default=21,
                    help="values a block holds (--layout blocks; 21 × 3072 B fill 16 pages)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpuengine-bench"))
    ap.add_argument("--out", required=True)
    add_commit_option(ap)
    args = ap.parse_args()
    path = args.workdir / "lmdb-values"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    env = lmdb.open(str(path), map_size=1 << 40, sync=not args.no_sync, max_dbs=2)
    db, blocks_db = env.open_db(b"e"), env.open_db(b"b")
    rng = np.random.default_rng(0)
    value = bytes(args.value_bytes)
    disk, written = DiskWrites(path), _process_written()
    next_block = 0
    started = time.perf_counter()
    for at in range(0, args.puts, args.per_txn):
        n = min(args.per_txn, args.puts - at)
        keys = sorted(b"\x01" + k for k in np.frombuffer(rng.bytes(16 * n), "V16").tolist())
        with env.begin(write=True) as txn:
            if args.layout == "values":
                txn.cursor(db=db).putmulti([(k, value) for k in keys])
                continue
            count = -(-n // args.per_block)
            numbers = range(next_block, next_block + count)
            txn.cursor(db=blocks_db).putmulti(
                [(b.to_bytes(8, "big"), value * min(args.per_block, n - i * args.per_block))
                 for i, b in enumerate(numbers)], append=True)
            txn.cursor(db=db).putmulti(
                [(k, (next_block + i // args.per_block).to_bytes(8, "big")
                  + (i % args.per_block).to_bytes(4, "big")) for i, k in enumerate(keys)])
            next_block += count
    seconds = time.perf_counter() - started
    env.sync(True)
    env.close()
    disk_written = disk.written()
    process_written = _process_written() - written
    rec = ResultsLog(args.out, args.commit, __file__).append(
        system="lmdb", value_bytes=args.value_bytes, puts=args.puts, per_txn=args.per_txn,
        sync=not args.no_sync, layout=args.layout,
        per_block=args.per_block if args.layout == "blocks" else None,
        puts_per_s=args.puts / seconds, seconds=seconds, written_gb=process_written / 1e9,
        written_per_value=round(process_written / args.puts),
        disk_written_gb=None if disk_written is None else disk_written / 1e9,
        file_gb=os.path.getsize(path / "data.mdb") / 1e9)
    shutil.rmtree(path, ignore_errors=True)
    print(rec)


if __name__ == "__main__":
    main()
