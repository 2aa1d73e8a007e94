"""Summarise py-spy profiles in raw (collapsed-stack) form, per thread.

Recorded with ``--threads`` (and ``--subprocesses``, or one file per process), every stack
starts with its process and thread; the summary then gives each thread (input processes
folded into one role, ``input``; the store writer process's threads as ``writer process``) its core-seconds (samples ÷ ``--rate``) and the functions
it spends them in (self time), counting only stacks inside gpuengine and leaving out
imports. Without those prefixes a thread is named by its outermost gpuengine function.

    python tools/pyspy_summary.py pyspy.txt [more.txt ...] [--rate 100] [--top 12]
"""

from __future__ import annotations

import argparse
import collections
import re

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")
_PROCESS = re.compile(r'^process \d+:"(?P<cmd>[^"]*)"$')
_THREAD = re.compile(r"^thread \(\d+\): (?P<name>.*)$")


def parse(path: str):
    """(process command, thread name, frames, samples) per stack line; a frame is
    (function, file); process and thread are "" where the profile does not name them."""
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        parts = stack.split(";")
        process = thread = ""
        while parts and (m := _PROCESS.match(parts[0])):  # a child's stacks: parent;child
            process, parts = m["cmd"], parts[1:]
        if parts and (m := _THREAD.match(parts[0])):
            thread, parts = m["name"], parts[1:]
        frames = []
        for raw in parts:
            m = _FRAME.match(raw)
            frames.append((m["func"], m["file"]) if m else (raw, ""))
        yield process, thread, frames, int(count)


def role(process: str, thread: str, frames) -> str | None:
    """What a stack's thread is: ``input`` for an input process, else the thread's name
    (or, unnamed, its outermost gpuengine function); None for a stack outside the engine
    or inside an import."""
    if any(func == "<module>" and "gpuengine/" in file and "inputs" not in file
           and "writer_process" not in file for func, file in frames):
        return None
    if not any("gpuengine/" in file for _, file in frames):
        return None
    if "gpuengine.inputs" in process or any(f == "_worker_main" for f, _ in frames):
        return "input process" + (f" / {thread}" if thread and thread != "MainThread" else "")
    if "gpuengine.writer_process" in process:
        return "writer process" + (f" / {thread}" if thread and thread != "MainThread" else "")
    if thread:
        return thread
    return next(func for func, file in frames if "gpuengine/" in file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--rate", type=float, default=100.0, help="py-spy's samples per second")
    args = ap.parse_args()
    threads, own = collections.Counter(), collections.defaultdict(collections.Counter)
    for path in args.paths:
        for process, thread, frames, n in parse(path):
            name = role(process, thread, frames)
            if name is None:
                continue
            threads[name] += n
            func, file = frames[-1]
            own[name][f"{func} ({file.rsplit('site-packages/', 1)[-1]})"] += n
    total = sum(threads.values())
    print(f"{total} samples inside gpuengine (imports left out); core-seconds at "
          f"{args.rate:g} samples/s")
    for name, n in threads.most_common():
        print(f"\n{n / total:6.1%}  {n / args.rate:7.1f} s  {name}")
        for func, m in own[name].most_common(args.top):
            print(f"    {m / total:6.1%}  {m / args.rate:7.1f} s  {func}")


if __name__ == "__main__":
    main()
