#!/usr/bin/env python3
"""The engine process's work per read, stage by stage, on one thread: what the interpreter
lock has to carry for the host pipeline (``bench_host_dna.py`` / ``bench_esm.py --systems
host``) without the noise of a shared machine.

Chunks are prepared first, untimed, as an input process does (parse, truncate, hash,
tokenize, embedding keys when the code computes them) and encoded as the ``CHNK`` frames
the engine reads. Then each stage of the engine's process runs the engine's own code on one
thread (with the engine's garbage-collector settings), timed with ``time.thread_time`` (CPU time of this thread only: another process on
the same core does not count): decoding the frames, the planner (``Planner.run``: ledger,
scheduler intake), the scheduler handing out batches to ``--devices`` no-op devices, the
no-op device, the engine loop's handling of each outcome (``_Run._on_outcome``), and the
committer (``Committer._commit``: encoding, LMDB puts and the commit with fsync, the ledger
release) in groups of ``--commit-every``; the committer's encoding (pure interpreter work) is
timed once more on its own. With the writer process (``gpuengine.writer_process``, where the
code has it) the engine's process does instead what its sender thread does: a group to frame
buffers (``encode_group``) written down a pipe (a thread drains it, untimed), and the child
decodes the frame (``decode_group``) and commits: ``engine_total_writer_process`` and
``writer_process_child`` sum those. ``--writers N`` (N > 1, ``embed --writers``) adds the
engine's split of each group by part store (``part split``; counted in
``engine_total_writer_process``), and the engine side sends each part's share. It prints one JSON row: µs per read per stage (CPU time,
so the LMDB part counts the kernel's copying of pages, not the wait for the disk).

    python tools/host_stage_costs.py --kind dna --reads 200000
    python tools/host_stage_costs.py --kind esm --reads 200000   # 650M dims (1280)
    python tools/host_stage_costs.py --kind dna --reads 200000 --budget 65536 --writers 2
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import NoopRunner, ResultsLog, add_commit_option  # noqa: E402
from gpuengine import inputs  # noqa: E402
from gpuengine.committer import Committer  # noqa: E402
from gpuengine.engine import _Run, relaxed_collector  # noqa: E402
from gpuengine.ledger import Ledger  # noqa: E402
from gpuengine.planner import Planner  # noqa: E402
from gpuengine.scheduler import Scheduler  # noqa: E402
from gpuengine.store.schema import ModelIdentity, OutputSpec, TableSpec  # noqa: E402
from gpuengine.store import writer as writer_module  # noqa: E402
from gpuengine.store.writer import StoreWriter  # noqa: E402
from gpuengine.worker import BatchOutcome  # noqa: E402


def _sequences(kind: str, n: int) -> tuple[list[str], object]:
    rng = np.random.default_rng(7)
    if kind == "dna":
        from gpuengine.dna_tokenizer import DnaTokenizer
        from gpuengine.synthetic import write_dnabert_s

        model = Path("/tmp/gpuengine-stage-costs/DNABERT-S")
        if not model.exists():
            write_dnabert_s(model, seed=0, num_layers=1)
        letters = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, (n, 150))]
        return [row.tobytes().decode() for row in letters], DnaTokenizer(model / "tokenizer.json")
    from gpuengine.tokenization import EsmTokenizer

    alphabet = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", np.uint8)
    lengths = rng.integers(30, 51, n)  # 150-bp reads' frames: up to 50 residues
    return [alphabet[rng.integers(0, 20, k)].tobytes().decode() for k in lengths], EsmTokenizer()


def _frames(seqs: list[str], tokenizer, prefixes: list[bytes]) -> list[bytearray]:
    """The CHNK payloads input processes would send (as much as this code's version puts in)."""
    keyed = "key_prefixes" in inspect.signature(inputs.prepare_lists).parameters
    frames = []
    for at in range(0, len(seqs), inputs.LOOKUP_CHUNK):
        part = seqs[at:at + inputs.LOOKUP_CHUNK]
        ids = [f"read{at + i}" for i in range(len(part))]
        extra = {"key_prefixes": prefixes} if keyed else {}
        chunk = inputs.prepare_lists(ids, part, tokenizer, None, None, **extra)
        frames.append(bytearray(b"".join(bytes(p) for p in inputs.encode_chunk(chunk)[1:])))
    return frames


def split_group(group, count):
    """The engine's split of a group by part store (``--writers N``), where the code has it."""
    from gpuengine.writer_parts import split_group as split

    return split(group, count)


def _pipe_sender():
    """send(group): the writer process's engine-side work for one group (down a pipe that a
    child process drains, as the writer's child reads it: a thread of this process would
    share its interpreter lock); None where the code has no writer process."""
    try:
        from gpuengine.store.group_frames import encode_group
        from gpuengine.pipe_frames import F_SETPIPE_SZ, PIPE_BYTES, frame, write_all
    except ImportError:
        return None
    import fcntl
    import subprocess

    drain = subprocess.Popen([sys.executable, "-c", "import sys\nb = bytearray(1 << 20)\n"
                              "while sys.stdin.buffer.raw.readinto(b): pass"],
                             stdin=subprocess.PIPE, bufsize=0)
    fcntl.fcntl(drain.stdin.fileno(), F_SETPIPE_SZ, PIPE_BYTES)

    def send(group):
        if group is None:
            drain.stdin.close()
            drain.wait()
            return
        write_all(drain.stdin.fileno(), frame(b"GRUP", encode_group(group, None)))
    return send


def _decode(group, spec):
    """The group as the child decodes it (its frame built untimed), and the decode timed."""
    from gpuengine.store.group_frames import decode_group, encode_group, split_payload

    payload = bytearray(b"".join(bytes(memoryview(b).cast("B")) for b in encode_group(group, None)))
    return lambda: decode_group(*split_payload(payload), spec.outputs)


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def time(self, stage: str, work, *args):
        start = time.thread_time()
        try:
            return work(*args)
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.thread_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=("dna", "esm"), default="dna")
    ap.add_argument("--reads", type=int, default=200_000)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--budget", type=int, default=None,
                    help="tokens per batch (default: as the host bench of the kind: 4096, "
                         "the CPU default, for dna; 65536 for esm)")
    ap.add_argument("--store-dtype", default="float32", choices=("float32", "float16"))
    ap.add_argument("--commit-every", type=int, default=8192)
    ap.add_argument("--writers", type=int, default=1,
                    help="part stores (embed --writers N): N > 1 times the engine's split of "
                         "each group by part (stage 'part split', writer_parts.split_group) "
                         "and the writer-process engine side sends each part's share")
    ap.add_argument("--out", type=Path, default=None,
                    help="also append the row to this results.jsonl (system "
                         "gpuengine-host-stages)")
    add_commit_option(ap)
    ap.add_argument("--store", type=Path, default=Path("/tmp/gpuengine-stage-costs/store.lmdb"))
    args = ap.parse_args()
    dim = 768 if args.kind == "dna" else 1280
    if args.budget is None:
        args.budget = 4096 if args.kind == "dna" else 65536
    seqs, tokenizer = _sequences(args.kind, args.reads)
    output = OutputSpec(1, "mean")
    spec = TableSpec("default", ModelIdentity(args.kind, "stage-costs", "0" * 64, 1, dim, 1, 32),
                     (output,), args.store_dtype, dim, None)
    frames = _frames(seqs, tokenizer, [spec.embedding_key_prefix(output)])
    shutil.rmtree(args.store, ignore_errors=True)
    clock = _Clock()
    with StoreWriter(args.store) as writer, relaxed_collector(0):  # as the engine's run (paused; too short to reach its periodic collection)
        writer.open_table(spec)
        writer.begin_run("stage-costs", {})
        ledger, scheduler = Ledger(), Scheduler()
        chunks = [clock.time("decode", inputs.decode_chunk, f) for f in frames]
        planner = Planner(ledger=ledger, lookup=writer.lookup(spec.name), submit=scheduler.submit,
                          alias=lambda pairs: None, stop=threading.Event(),
                          expected_records=len(seqs))
        clock.time("planner", planner.run, chunks)
        scheduler.close()
        runner = NoopRunner((output,), dim)
        loop = SimpleNamespace(scheduler=scheduler, ledger=ledger, parts=None, group=[],
                               group_rows=0, spec=spec)
        committer = Committer(writer, spec.name, "stage-costs", ledger)  # not started: its
        device = 0                                                      # _commit, timed here
        send = _pipe_sender()
        while (batch := clock.time("scheduler", scheduler.next_batch, device, args.budget)):
            device = (device + 1) % args.devices
            result = clock.time("device", runner.finish, runner.launch(runner.stage(batch.items)))
            clock.time("engine loop", _Run._on_outcome, loop,
                       BatchOutcome("ok", batch.device, batch, result))
            if loop.group_rows >= args.commit_every or scheduler.finished:
                clock.time("(of which encoding)", writer_module.encode_for_commit, spec, loop.group)
                shares = [loop.group]
                if args.writers > 1:
                    shares = [share for share in clock.time("part split", split_group,
                                                            loop.group, args.writers) if share]
                if send is not None:
                    for share in shares:
                        clock.time("writer process: engine side", send, share)
                    clock.time("writer process: child decode", _decode(loop.group, spec))
                clock.time("committer", committer._commit, loop.group, None, 1)
                loop.group, loop.group_rows = [], 0
        if send is not None:
            send(None)
        if committer.error is not None:
            raise committer.error
        assert committer.counts.records == len(seqs), committer.counts
    shutil.rmtree(args.store, ignore_errors=True)
    per_read = {stage: round(1e6 * s / len(seqs), 2) for stage, s in clock.seconds.items()}
    engine = [k for k in per_read if not k.startswith(("(", "writer process", "part split"))]
    per_read["total"] = round(sum(per_read[k] for k in engine), 2)
    if send is not None:
        per_read["engine_total_writer_process"] = round(
            per_read["total"] - per_read["committer"] + per_read["writer process: engine side"]
            + per_read.get("part split", 0.0), 2)
        per_read["writer_process_child"] = round(
            per_read["writer process: child decode"] + per_read["committer"], 2)
    row = {"kind": args.kind, "reads": len(seqs), "devices": args.devices,
           "budget": args.budget, "writers": args.writers, "us_per_read": per_read}
    if args.out is not None:
        row = ResultsLog(args.out, args.commit, __file__).append(
            system="gpuengine-host-stages", workload=f"{args.kind}-stages", **row,
            note="CPU µs per read of each stage of the engine's process, one thread "
                 "(time.thread_time); no-op devices")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
