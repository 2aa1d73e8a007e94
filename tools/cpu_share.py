#!/usr/bin/env python3
"""Where a command's CPU goes, by process: runs the command, samples /proc every ``--every``
seconds, and prints each process's CPU seconds, user and system, and mean cores (grouped by
role: its command line's module or script), the command's own threads by name (the native
name: Python 3.12 does not set it from ``threading``; ``tools/bench_common.py`` does), and the
whole machine's busy share, while it ran.

    python tools/cpu_share.py -- python tools/bench_host_dna.py --reads 2000000 --devices 8 \\
        --budget 65536 --cores 16 --writers 2 --out r.jsonl

Linux only (reads /proc). The table goes to stderr; ``--json FILE`` also writes it as JSON.
A process that exits between two samples loses at most one interval of its CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int, task: int | None = None) -> tuple[int, float, float, str] | None:
    """(parent pid, user and system CPU seconds, name) of a process (all its threads), or of
    one of its threads (``task``)."""
    path = f"/proc/{pid}/stat" if task is None else f"/proc/{pid}/task/{task}/stat"
    try:
        raw = Path(path).read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[1]), int(fields[11]) / TICK, int(fields[12]) / TICK,
            raw[raw.index("(") + 1:raw.rindex(")")])


def _threads(pid: int) -> dict[int, tuple[str, float, float]]:
    out = {}
    try:
        tasks = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return out
    for task in tasks:
        got = _stat(pid, task)
        if got is not None:
            out[task] = (got[3], got[1], got[2])
    return out


def _role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    argv = [a.decode(errors="replace") for a in argv if a]
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    scripts = [Path(a).name for a in argv[1:] if a.endswith(".py")]
    return scripts[0] if scripts else Path(argv[0]).name if argv else "?"


def _machine() -> tuple[float, float]:
    """(busy, total) jiffies of every core since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _tree(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            got = _stat(int(entry.name))
            if got is not None:
                parents[int(entry.name)] = got[0]
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=float, default=0.2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("no command")
    busy0, total0 = _machine()
    start = time.monotonic()
    child = subprocess.Popen(command)
    seen: dict[int, tuple[str, float, float, float, float]] = {}  # pid → role, user, sys, first, last
    threads: dict[int, tuple[str, float, float]] = {}  # the command's own threads
    while child.poll() is None:
        now = time.monotonic() - start
        for pid in _tree(child.pid):
            got = _stat(pid)
            if got is None:
                continue
            role, _, _, first, _ = seen.get(pid, (None, 0.0, 0.0, now, now))
            seen[pid] = (role or _role(pid), got[1], got[2], first, now)
        threads.update(_threads(child.pid))
        time.sleep(args.every)
    wall = time.monotonic() - start
    busy1, total1 = _machine()
    cores = os.cpu_count() or 1
    roles: dict[str, list[float]] = {}
    for role, user, system, first, last in seen.values():
        row = roles.setdefault(role, [0, 0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += user
        row[2] += system
        row[3] = max(row[3], last - first)
    named: dict[str, list[float]] = {}
    for name, user, system in threads.values():
        row = named.setdefault(name, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += user
        row[2] += system
    by_cpu = lambda kv: -(kv[1][1] + kv[1][2])  # noqa: E731
    table = {"wall_s": wall, "machine_busy": (busy1 - busy0) / max(1, total1 - total0),
             "machine_cores": cores, "exit": child.returncode,
             "roles": {role: {"processes": n, "user_s": user, "sys_s": system, "longest_s": span}
                       for role, (n, user, system, span) in sorted(roles.items(), key=by_cpu)},
             "threads": {name: {"threads": n, "user_s": user, "sys_s": system}
                         for name, (n, user, system) in sorted(named.items(), key=by_cpu)}}
    print(f"cpu_share: wall {wall:.1f} s, machine busy {100 * table['machine_busy']:.0f} % of "
          f"{cores} cores", file=sys.stderr)
    for role, row in table["roles"].items():
        cpu = row["user_s"] + row["sys_s"]
        print(f"  {role:36s} {row['processes']:3d} proc  {cpu:8.1f} cpu-s ({row['sys_s']:6.1f} "
              f"system)  {cpu / wall:5.2f} cores over the wall", file=sys.stderr)
    print("  the command's own threads, by name:", file=sys.stderr)
    for name, row in table["threads"].items():
        cpu = row["user_s"] + row["sys_s"]
        print(f"    {name:34s} {row['threads']:3d} thr   {cpu:8.1f} cpu-s ({row['sys_s']:6.1f} "
              f"system)", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
