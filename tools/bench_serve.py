#!/usr/bin/env python3
"""Many small files through ``gpuengine serve`` against one large file, same proteins, same
model, same daemon options (issue 16): does sharing batches keep the GPU as busy?

    python tools/bench_serve.py --out results.jsonl                  # 2000 x 100 vs 1 x 200 000
    python tools/bench_serve.py --quick --out /tmp/rows.jsonl        # CPU smoke run, seconds

For each workload a fresh watch directory and store, and a real ``gpuengine serve`` process
(``--gpus 0``, or the CPU with ``--quick``); once it is ready (status.json), the files are
renamed into ``inbox/`` from a staging folder on the same filesystem, as pipelines are told to,
and the clock runs from the first rename to the last file's job record in ``done/``:

* ``files-1x200000``: one FASTA of 200 000 proteins;
* ``files-2000x100``: the same proteins as 2 000 files of 100.

Rows (system ``gpuengine-serve``): ``sequences_per_s`` over that span; ``file_latency_s``:
median (and 90th percentile) from a file's rename into inbox/ to its job record in done/,
and ``claim_to_done_s``, the daemon's own median from claiming a file to moving it; the
many-files row has ``ratio_vs_single`` (its rate over the single file's; the goal is
≥ 0.8). Proteins are 48-50 residues (a 150-bp read's frame, as VirNucPro embeds them); the
model is ESM-2 650M (random weights of the real shape) unless ``--model esm2-8M``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import ResultsLog, add_commit_option  # noqa: E402
from bench_replicas import AMINO, model_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def proteins(count: int, seed: int = 11) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(48, 51, count)
    return [AMINO[rng.integers(0, 20, n)].tobytes().decode() for n in lengths]


def write_files(staging: Path, seqs: list[str], n_files: int) -> dict[str, int]:
    """``seqs`` split into ``n_files`` FASTA files under ``staging``; {name: sequences}."""
    staging.mkdir(parents=True, exist_ok=True)
    per = -(-len(seqs) // n_files)
    files = {}
    for k in range(n_files):
        chunk = seqs[k * per:(k + 1) * per]
        if not chunk:
            break
        name = f"batch{k:05d}.fa"
        (staging / name).write_text("".join(f">f{k}_{i}\n{s}\n" for i, s in enumerate(chunk)))
        files[name] = len(chunk)
    return files


class Daemon:
    """A ``gpuengine serve`` process on ``watch`` (stderr to ``watch.parent/serve.err``)."""

    def __init__(self, watch: Path, store: Path, model: Path, args):
        self.watch = watch
        self.err = watch.parent / f"{watch.name}.serve.err"
        cmd = [sys.executable, "-m", "gpuengine", "serve", "--watch", str(watch), "--store",
               str(store), "--model", str(model), "--gpus", "cpu" if args.quick else "0",
               "--replicas-per-gpu", str(args.replicas), "--group-files", str(args.group_files),
               "--poll-interval", "0.1", "--settle", "1", "--status-interval", "1", "--offline"]
        env = {**os.environ, "GPUENGINE_OFFLINE": "1"}
        with open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                         env=env)

    def status(self) -> dict:
        try:
            return json.loads((self.watch / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.status().get("state") != "ready":
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gpuengine serve did not get ready:\n{self.err.read_text()}")
            time.sleep(0.1)

    def diagnosis(self) -> str:
        """Why a workload did not finish: the daemon's status (progress, budgets, GPU memory)
        and, while it runs and py-spy is installed, every thread's stack."""
        status = self.status()
        keep = {k: status.get(k) for k in ("state", "processing", "devices", "gpu_memory",
                                           "last_error", "heartbeat")}
        text = "\n--- status.json ---\n" + json.dumps(keep, indent=1, default=str)
        spy = shutil.which("py-spy")
        if self.proc.poll() is None and spy:
            try:
                dump = subprocess.run([spy, "dump", "--pid", str(self.proc.pid)],
                                      capture_output=True, text=True, timeout=60)
                text += f"\n--- py-spy dump ---\n{dump.stdout}{dump.stderr}"
            except (OSError, subprocess.SubprocessError) as exc:
                text += f"\n(py-spy dump failed: {exc})"
        return text

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def serve_workload(label: str, seqs: list[str], n_files: int, model: Path, args) -> dict:
    """One workload through a fresh daemon; its measurement (see the module docstring)."""
    base = args.workdir / f"serve-{label}"
    shutil.rmtree(base, ignore_errors=True)
    watch, staging = base / "watch", base / "watch" / "staging"
    files = write_files(staging, seqs, n_files)
    daemon = Daemon(watch, base / "store.lmdb", model, args)
    try:
        daemon.wait_ready(args.ready_timeout)
        dropped = {}
        started = time.time()
        for name in files:  # the documented way: written elsewhere, renamed into inbox/
            dropped[name] = time.time()
            os.replace(staging / name, watch / "inbox" / name)
        done = watch / "done"
        deadline = time.monotonic() + args.timeout
        while sum(1 for n in os.listdir(done) if n.endswith(".job.json")) < len(files):
            if daemon.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{label}: not every file was done:\n{daemon.err.read_text()}"
                                 f"{daemon.diagnosis()}")
            time.sleep(0.05)
        finished = {n: os.stat(done / f"{n}.job.json").st_mtime for n in files}
        records = [json.loads((done / f"{n}.job.json").read_text()) for n in files]
        status = daemon.status()
    finally:
        code = daemon.stop()
    failed = sorted(os.listdir(watch / "failed"))
    if code != 0 or failed:
        raise SystemExit(f"{label}: serve exited {code}, failed/: {failed}\n"
                         f"{daemon.err.read_text()[-4000:]}")
    seconds = max(finished.values()) - started
    latency = sorted(finished[n] - dropped[n] for n in files)
    claim = sorted(r["seconds"] for r in records)
    sequences = sum(r["counts"]["embedded"] for r in records)
    runs = {r["engine_run"]["run_id"] for r in records}
    shutil.rmtree(base, ignore_errors=True)
    return {"workload": label, "files": len(files), "sequences": sequences,
            "sequences_per_s": sequences / seconds, "seconds": seconds,
            "file_latency_s": {"median": statistics.median(latency),
                               "p90": latency[int(0.9 * (len(latency) - 1))]},
            "claim_to_done_s": {"median": statistics.median(claim),
                                "p90": claim[int(0.9 * (len(claim) - 1))]},
            "engine_runs": len(runs), "devices": status.get("devices")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="esm2-650M", choices=("esm2-650M", "esm2-8M"),
                    help="random weights of the real shape (default 650M; with 8M the host "
                    "pipeline, not the GPU, sets the pace)")
    ap.add_argument("--files", type=int, default=2000, help="small files")
    ap.add_argument("--per-file", type=int, default=100, help="proteins per small file")
    ap.add_argument("--replicas", type=int, default=1, help="--replicas-per-gpu of the daemon")
    ap.add_argument("--group-files", type=int, default=1024, help="--group-files of the daemon")
    ap.add_argument("--quick", action="store_true",
                    help="the tiny model on the CPU, 40 files of 25 (checks the tool)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per workload")
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpuengine-bench"))
    add_commit_option(ap)
    args = ap.parse_args()
    if args.quick:
        args.files, args.per_file = min(args.files, 40), min(args.per_file, 25)
    else:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("tools/bench_serve.py needs a CUDA GPU (or --quick for the CPU)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = model_path(args.model, args.workdir, args.quick)
    total = args.files * args.per_file
    seqs = proteins(total)
    single = serve_workload(f"files-1x{total}", seqs, 1, model, args)
    many = serve_workload(f"files-{args.files}x{args.per_file}", seqs, args.files, model, args)
    many["ratio_vs_single"] = many["sequences_per_s"] / single["sequences_per_s"]
    label = f"tiny stand-in for {args.model}" if args.quick else args.model
    log = ResultsLog(args.out, args.commit, __file__, model=label,
                     system="gpuengine-serve", replicas_per_gpu=args.replicas,
                     group_files=args.group_files, quick=args.quick)
    for row in (single, many):
        log.append(**row)
        print(json.dumps({k: v for k, v in row.items() if k != "devices"}), flush=True)
    print(f"\n# {many['files']} files of {args.per_file}: {many['sequences_per_s']:,.0f} seq/s, "
          f"{many['ratio_vs_single']:.0%} of one file of {total} "
          f"({single['sequences_per_s']:,.0f} seq/s); median file latency "
          f"{many['file_latency_s']['median']:.2f} s (claim to done/ "
          f"{many['claim_to_done_s']['median']:.2f} s)")


if __name__ == "__main__":
    main()
