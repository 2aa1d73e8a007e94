"""Summarise a py-spy profile in raw (collapsed-stack) form: the share of samples per engine
thread, and the functions each spends them in (self time), counting only stacks inside
gpuengine and leaving out imports.

    python tools/pyspy_summary.py pyspy.txt [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import re

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")


def parse(path: str):
    """(frames, samples) per stack line; a frame is (function, file)."""
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        frames = []
        for raw in stack.split(";"):
            m = _FRAME.match(raw)
            frames.append((m["func"], m["file"]) if m else (raw, ""))
        yield frames, int(count)


def thread_of(frames) -> str | None:
    """The outermost gpuengine function of a stack (the thread's loop or entry), or None for a
    stack outside the engine or inside an import."""
    if any(func == "<module>" and "gpuengine/" in file for func, file in frames):
        return None
    return next((func for func, file in frames if "gpuengine/" in file), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    threads, own = collections.Counter(), collections.defaultdict(collections.Counter)
    for frames, n in parse(args.path):
        thread = thread_of(frames)
        if thread is None:
            continue
        threads[thread] += n
        func, file = frames[-1]
        own[thread][f"{func} ({file.rsplit('site-packages/', 1)[-1]})"] += n
    total = sum(threads.values())
    print(f"{total} samples inside gpuengine (imports left out)")
    for thread, n in threads.most_common():
        print(f"\n{n / total:6.1%}  {thread}")
        for func, m in own[thread].most_common(args.top):
            print(f"    {m / total:6.1%}  {func}")


if __name__ == "__main__":
    main()
