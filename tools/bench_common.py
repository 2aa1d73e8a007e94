"""Shared by the benchmark scripts: the rows they append to a results.jsonl (the run's header
and ``--commit``), driving the engine's device worker over prepared items, profiling a runner's
kernels, the host pipeline with a no-op runner, and the GEMM ceiling with the clocks NVML reports
meanwhile."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gpuengine.budget import TokenBudget
from gpuengine.devices import MemoryProbe
from gpuengine.packing import ItemBlock
from gpuengine.progress import ProgressSink
from gpuengine.scheduler import Scheduler
from gpuengine.worker import DeviceWorker, WorkerExit


# -- results rows -------------------------------------------------------------------------------

def add_commit_option(parser: argparse.ArgumentParser) -> None:
    """``--commit``: the commit every row names (default ``$GPUENGINE_COMMIT``, else "unknown":
    the device machine's copy of the tree has no git history)."""
    parser.add_argument("--commit", default=os.environ.get("GPUENGINE_COMMIT", "unknown"))


def gpu_label() -> str:
    """GPU 0's name, or ``none (CPU, N cores)`` on a machine without CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"none (CPU, {os.cpu_count()} cores)"


def require_cuda(script: str) -> None:
    """Stop with a message, before any work, where there is no CUDA GPU."""
    if not torch.cuda.is_available():
        raise SystemExit(f"tools/{Path(script).name} needs a CUDA GPU")


class ResultsLog:
    """One run's rows of a results.jsonl. Every row starts with the run's header (``date`` of
    the row, ``commit``, ``gpu``, ``n_gpus``, ``command``: the script's command line, ``torch``:
    its version), then the script's ``fields`` common to all its rows, then the measurement;
    a later key replaces an earlier one. ``with_torch=False`` leaves ``torch`` out (the rows
    of ``bench_predict.py`` have never carried it)."""

    def __init__(self, out: Path, commit: str, script: str, *, n_gpus: int = 1,
                 with_torch: bool = True, **fields):
        self.out = Path(out)
        self.header = {"commit": commit, "gpu": gpu_label(), "n_gpus": n_gpus,
                       "command": f"python tools/{Path(script).name} " + " ".join(sys.argv[1:])}
        if with_torch:
            self.header["torch"] = torch.__version__
        self.header.update(fields)

    def row(self, **measurement) -> dict:
        """The row for ``measurement``, dated now (not written)."""
        row = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        row.update(self.header)
        row.update(measurement)
        return row

    def append(self, **measurement) -> dict:
        """Append the row for ``measurement`` to the file, one JSON line; returns the row."""
        row = self.row(**measurement)
        with open(self.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row


# -- inputs and checks -------------------------------------------------------------------------

def write_reads_fasta(path: Path, count: int, draw, block: int = 100_000) -> Path:
    """A FASTA of ``count`` reads named ``read0``, ``read1``, …, drawn ``block`` at a time:
    ``draw(n)`` returns an (n, length) uint8 array of bases, one read a row."""
    with open(path, "w") as f:
        for start in range(0, count, block):
            rows = draw(min(block, count - start))
            f.write("".join(f">read{start + i}\n{row.tobytes().decode()}\n"
                            for i, row in enumerate(rows)))
    return Path(path)


def cosine_summary(a: np.ndarray, b: np.ndarray) -> dict:
    """``min_cosine`` and ``mean_cosine`` between each row of ``a`` and the same row of ``b``."""
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def closed_scheduler(items) -> Scheduler:
    """A scheduler holding ``items`` and closed: its batches end when they run out."""
    sched = Scheduler()
    sched.submit(items)
    sched.close()
    return sched


# -- the device worker and its kernels -----------------------------------------------------------

def drive_worker(runner, items, budget: int, depth: int = 2, calibrate: bool = True) -> dict:
    """The engine's device pipeline without input parsing or the store: scheduler → worker
    thread (stage + launch batch k+1, then finish batch k) → results, after a warm-up batch at
    the full budget. Returns tokens, residues, sequences, seconds and the busy fraction."""
    if calibrate:
        runner.calibrate(budget)
    sched = closed_scheduler(items)
    outbox, halt = queue.Queue(), threading.Event()
    worker = DeviceWorker(0, runner, TokenBudget(budget, budget), sched, outbox, halt, depth=depth)
    torch.cuda.synchronize()
    start = time.perf_counter()
    worker.start()
    tokens = residues = sequences = batches = 0
    while True:
        msg = outbox.get()
        if isinstance(msg, WorkerExit):
            if msg.error:
                raise msg.error
            break
        assert msg.kind == "ok", msg
        sched.complete(msg.batch.batch_id)
        tokens += msg.batch.n_tokens
        residues += sum(i.residues for i in msg.batch.items)
        sequences += len(msg.batch.items)
        batches += 1
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "residues": residues, "sequences": sequences, "seconds": seconds,
            "batches": batches,
            "busy_fraction": worker.stats.busy_seconds / seconds}


def profile_batches(runner, items, budget: int, path: Path, row_limit: int = 25) -> str:
    """Kernel time breakdown (torch.profiler) of two full batches after a warm-up batch;
    printed and written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    sched = closed_scheduler(items)
    batches = [sched.next_batch(0, budget).items for _ in range(3)]
    runner.embed(batches[0])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b in batches[1:]:
            runner.embed(b)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=row_limit,
                                      max_name_column_width=60)
    print(table, flush=True)
    Path(path).write_text(table)
    return table


def kernel_timeline(runner, items, budget: int, path: Path | None = None, top: int = 12) -> dict:
    """The device worker over ``items`` (runner already warm) under torch.profiler, read from
    the kernels' own start/end times: the fraction of the span from the first kernel to the
    last in which some kernel ran (``kernel_busy``; CUDA events count gaps between kernels as
    busy), the idle time in gaps longer than 20 µs, and the largest gaps with the kernels on
    either side. Written to ``path`` as text when given."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = drive_worker(runner, items, budget, calibrate=False)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                     if e.get("cat") == "kernel" and e.get("ph") == "X")
    busy, gaps, end, prev = 0.0, [], None, None
    for start, stop, name in kernels:
        if end is None or start >= end:
            if end is not None:
                gaps.append((start - end, prev, name))
            busy += stop - start
            end, prev = stop, name
        elif stop > end:
            busy += stop - end
            end, prev = stop, name
    span = kernels[-1][1] - kernels[0][0] if kernels else 0.0
    long_gaps = [g for g in gaps if g[0] > 20]
    gaps.sort(key=lambda g: -g[0])
    summary = {"kernels": len(kernels), "span_s": span / 1e6, "kernel_busy": busy / span if span else None,
               "idle_in_gaps_over_20us_s": sum(g[0] for g in long_gaps) / 1e6,
               "gaps_over_20us": len(long_gaps), "batches": result.get("batches"),
               "tokens_per_s_profiled": result["tokens"] / result["seconds"]}
    lines = [json.dumps(summary)] + [f"{g:9.1f} us  after {a[:70]}  before {b[:70]}"
                                      for g, a, b in gaps[:top]]
    text = "\n".join(lines)
    print(text, flush=True)
    if path is not None:
        Path(path).write_text(text + "\n")
    return summary


# -- the host pipeline --------------------------------------------------------------------------


def _tokens(items) -> int:
    """A batch's tokens: its block's token counts summed (work items one by one otherwise)."""
    if isinstance(items, ItemBlock):
        return sum(items.n_tokens)
    return sum(item.n_tokens for item in items)


class NoopRunner:
    """Replaces the GPU step: returns zero vectors of width ``dim`` at once (measures the host
    pipeline). :meth:`factory` makes the ``runner_factory`` that ``run_embed`` calls."""

    cuda = False
    padded = False
    precision = "fp32"
    hand_over_dtype: str | None = None
    """As :attr:`gpuengine.runner.Runner.hand_over_dtype` (set by the engine)."""

    def __init__(self, outputs, dim: int):
        self.device, self.outputs, self.dim = torch.device("cpu"), outputs, dim
        self._zeros: dict[tuple, np.ndarray] = {}

    @classmethod
    def factory(cls, dim: int):
        """A ``runner_factory(device, precision, outputs)`` making no-op runners of width ``dim``."""
        def make(device, precision, outputs):
            return cls(outputs, dim)
        return make

    def stage(self, items):
        return items

    def launch(self, items):
        return items

    def finish(self, items):
        from gpuengine.runner import EmbeddedBatch

        # as the runner: one (items, dim) array, in the store's dtype when the engine says
        # so; made once per batch size
        dtype = np.float16 if self.hand_over_dtype == "float16" else np.float32
        zeros = self._zeros.get((len(items), dtype))
        if zeros is None:
            zeros = self._zeros[len(items), dtype] = np.zeros((len(items), self.dim), dtype)
        return EmbeddedBatch({o: zeros for o in self.outputs},
                             np.ones(len(items), bool), _tokens(items), 0.0)

    def release_cached_memory(self):
        pass

    def calibrate(self, tokens):
        return 0


def run_e2e(model, fasta, budget, workdir, *, noop_dim: int | None = None, devices: int = 1,
            writers: int | None = 1, store_dtype: str = "float32"):
    """`gpuengine embed` in-process: FASTA → validate → plan → devices → LMDB commit, into a
    store under ``workdir`` removed before and after. With ``noop_dim`` the GPU step is a
    :class:`NoopRunner` of that width on ``devices`` no-op devices (each its own worker thread
    and budget, as a GPU's; the host pipeline); else fp16 on every GPU. ``writers``: store
    writer processes (part stores; None: as ``gpuengine embed`` chooses); the summary's
    ``writers`` says how many the run used. ``store_dtype``: as ``embed --store-dtype``."""
    import shutil
    from unittest import mock

    from gpuengine import replicas
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed

    noop = noop_dim is not None
    store = Path(workdir) / ("host.lmdb" if noop else "e2e.lmdb")
    shutil.rmtree(store, ignore_errors=True)
    cfg = EmbedConfig(inputs=(Path(fasta),), model=str(model), out=store, max_tokens=budget,
                      devices="cpu" if noop else "auto", precision=None if noop else "fp16",
                      writers=writers, store_dtype=store_dtype)
    cpus = [torch.device("cpu")] * devices
    clock = MainProcessCpu()
    with mock.patch.object(replicas, "parse_devices", lambda spec: cpus) if noop else _nothing():
        summary = run_embed(cfg, progress=clock,
                            runner_factory=NoopRunner.factory(noop_dim) if noop else None)
    shutil.rmtree(store, ignore_errors=True)
    summary.main_cpu_seconds = clock.seconds  # not a RunSummary field: the benches' own
    return summary


class DiskWrites:
    """Bytes the block device holding ``path`` writes from now on (``/proc/diskstats``,
    sectors of 512 bytes; Linux). None where the path is not on a block device listed there
    (tmpfs, or not Linux)."""

    def __init__(self, path) -> None:
        dev = os.stat(path).st_dev
        self._key = (os.major(dev), os.minor(dev))
        self._start = self._sectors()

    def _sectors(self) -> int | None:
        try:
            lines = Path("/proc/diskstats").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            fields = line.split()
            if (int(fields[0]), int(fields[1])) == self._key:
                return int(fields[9])
        return None

    def written(self) -> int | None:
        """Bytes written since this was made."""
        end = self._sectors()
        return None if self._start is None or end is None else 512 * (end - self._start)

    def fields(self, sequences: int, seconds: float) -> dict:
        """A results row's ``disk_written_bytes``, ``disk_written_per_seq`` and
        ``disk_mb_per_s`` (over ``seconds``), all None where unknown."""
        written = self.written()
        if written is None:
            return dict.fromkeys(("disk_written_bytes", "disk_written_per_seq", "disk_mb_per_s"))
        return {"disk_written_bytes": written,
                "disk_written_per_seq": round(written / max(1, sequences)),
                "disk_mb_per_s": round(written / max(seconds, 1e-9) / 1e6)}


def name_native_threads() -> None:
    """Give every thread started from now on its ``threading`` name as the native one (less
    ``gpuengine-``, cut to the kernel's 15 bytes), so per-thread CPU in /proc, top -H and
    tools/cpu_share.py can be told apart (CPython sets it itself only from 3.14). Linux only;
    elsewhere nothing happens."""
    import ctypes

    bootstrap = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]
    if getattr(bootstrap, "names_natively", False):
        return  # once per process
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return

    def named(thread: threading.Thread) -> None:
        prctl(15, thread.name.removeprefix("gpuengine-")[:15].encode(), 0, 0, 0)  # PR_SET_NAME
        bootstrap(thread)

    named.names_natively = True  # type: ignore[attr-defined]
    threading.Thread._bootstrap_inner = named  # type: ignore[attr-defined]


class MainProcessCpu(ProgressSink):
    """A progress sink that measures the CPU time of this process (all its threads, not the
    input children) from the start of embedding to the end of the run: the engine's own
    work, which one interpreter lock limits; unlike a py-spy ``--gil`` profile it does not
    count the time a thread holding the lock waits for a core another process uses."""

    def __init__(self) -> None:
        self._start: float | None = None
        self.seconds = 0.0

    @staticmethod
    def _cpu() -> float:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def start(self, total_records: int, total_residues: int) -> None:
        self._start = self._cpu()

    def close(self) -> None:
        if self._start is not None:
            self.seconds = self._cpu() - self._start


def _nothing():
    import contextlib

    return contextlib.nullcontext()


# -- host benches: devices, cores, curve ------------------------------------------------------

def add_host_options(parser: argparse.ArgumentParser) -> None:
    """``--devices``, ``--cores`` and ``--curve`` of the host benches."""
    parser.add_argument("--devices", type=int, default=1,
                        help="no-op devices (each a worker thread fed by the scheduler, as a GPU)")
    parser.add_argument("--cores", type=int, default=None,
                        help="cores the run (and its input processes) may use: the first N this "
                             "process may run on (default: all); the input processes are as "
                             "many as the engine picks for them (cores - 2; DNA at least "
                             "min(cores, 2), ESM-2 1 to 4) unless GPUENGINE_INPUT_PROCESSES "
                             "says")
    parser.add_argument("--writers", default="auto",
                        help="store writer processes, each writing one part store (embed "
                             "--writers); auto: as gpuengine embed chooses (1 below 8 cores)")
    parser.add_argument("--curve", default="",
                        help="comma-separated core counts, e.g. 2,4,8,16: one run (a fresh "
                             "process, one row) per count")


def writers_option(text: str) -> int | None:
    """``--writers``: a number, or None for ``auto``."""
    return None if text == "auto" else int(text)


def limit_cores(cores: int | None) -> int:
    """Pin this process (and the children it starts later) to its first ``cores`` allowed
    CPUs; returns the cores it may use now (fewer than asked where the machine has fewer)."""
    allowed = sorted(os.sched_getaffinity(0))
    if cores is not None:
        allowed = allowed[:max(1, cores)]
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(len(allowed))
    return len(allowed)


def run_curve(script: str, curve: str) -> None:
    """Run ``script`` again once per core count of ``curve`` (``--cores N``; the rest of this
    command line as given), each in a fresh process that writes its own row."""
    import subprocess

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in ("--curve", "--cores"):
            skip = True
        elif not arg.startswith(("--curve=", "--cores=")):
            argv.append(arg)
    for cores in [int(c) for c in curve.split(",") if c.strip()]:
        print(f"# --cores {cores}", flush=True)
        subprocess.run([sys.executable, script, *argv, "--cores", str(cores)], check=True)


class GpuClocks:
    """Samples GPU 0's SM clock, power draw and clock-event reasons through NVML while a
    measurement runs (``with GpuClocks() as c: ...; c.summary()``), to tell a GEMM running at
    full clock from one held back by the power limit. Empty summary without NVML."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        probe = MemoryProbe(torch.device("cuda", 0))  # maps the CUDA ordinal to NVML by UUID
        self._nv = None
        if probe.source == "nvml":  # else no NVML: the measurement runs without clocks
            import pynvml

            self._nv, self._h = pynvml, pynvml.nvmlDeviceGetHandleByUUID(probe.uuid)

    def _sample(self) -> None:
        nv = self._nv
        power_cap = nv.nvmlClocksEventReasonSwPowerCap
        slowdown = (nv.nvmlClocksEventReasonSwThermalSlowdown | nv.nvmlClocksEventReasonHwSlowdown
                    | nv.nvmlClocksEventReasonHwThermalSlowdown
                    | nv.nvmlClocksEventReasonHwPowerBrakeSlowdown)
        while not self._stop.wait(self.interval):
            r = nv.nvmlDeviceGetCurrentClocksEventReasons(self._h)
            self.samples.append((nv.nvmlDeviceGetClockInfo(self._h, nv.NVML_CLOCK_SM),
                                 nv.nvmlDeviceGetPowerUsage(self._h) / 1000.0,
                                 bool(r & power_cap), bool(r & slowdown)))

    def __enter__(self):
        if self._nv is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._nv is not None:
            self._thread.join()

    def summary(self) -> dict:
        """Mean SM clock (MHz) against the maximum, mean power (W) against the limit, and the
        fraction of samples in which the driver named the software power cap, or a thermal or
        hardware slowdown, as holding the clock back."""
        if not self.samples:
            return {}
        n = len(self.samples)
        nv, h = self._nv, self._h
        return {"sm_clock_mhz": round(sum(s[0] for s in self.samples) / n),
                "sm_clock_max_mhz": nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_SM),
                "power_w": round(sum(s[1] for s in self.samples) / n, 1),
                "power_limit_w": nv.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
                "power_capped": round(sum(s[2] for s in self.samples) / n, 3),
                "slowdown": round(sum(s[3] for s in self.samples) / n, 3),
                "clock_samples": n}


def gemm_rate(d: int, seconds: float = 0.0, *, products: int = 20,
              warmup: int = 3) -> tuple[float, dict]:
    """FLOP/s of a bf16 GEMM of 16384 × d by d × 4d (the ceiling's rate; DNABERT-S: 768 × 3072),
    timed with CUDA events over ``products`` back-to-back products after ``warmup`` (the burst
    rate, the ceiling the goals are stated against), or repeated for ``seconds`` (sustained);
    with the SM clock and power NVML reported meanwhile (:class:`GpuClocks` summary)."""
    a = torch.randn(16384, d, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(d, 4 * d, device="cuda", dtype=torch.bfloat16)
    return product_rate(lambda: a @ b, 2 * 16384 * d * 4 * d, seconds, products=products,
                        warmup=warmup)


def product_rate(product: Callable[[], object], flops: int, seconds: float = 0.0, *,
                 products: int = 20, warmup: int = 3) -> tuple[float, dict]:
    """FLOP/s of ``product`` (a CUDA computation of ``flops``), timed as :func:`gemm_rate`
    says: CUDA events over ``products`` back-to-back calls after ``warmup``, or repeated for
    ``seconds``; with the :class:`GpuClocks` summary of the time."""
    for _ in range(warmup):
        product()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    with GpuClocks(0.005) as clocks:
        start.record()
        while n == 0 or time.perf_counter() - t0 < seconds:
            for _ in range(products):
                product()
            n += products
            if seconds:
                torch.cuda.synchronize()
        end.record()
        torch.cuda.synchronize()
    return n * flops / (start.elapsed_time(end) / 1000), clocks.summary()
