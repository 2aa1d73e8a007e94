"""Every thread and child process a run starts is stopped and joined before it returns, on
every path; ``gpuengine embed`` exits 0 after a complete run, however busy the machine.

The failure this guards against (issue 13): a device worker thread still inside torch when
the interpreter exits (it had reported its last batch and was freeing that batch's tensors,
descheduled on a busy machine) is killed by CPython's finalisation with ``pthread_exit``;
unwinding through torch's C++ frames calls ``std::terminate`` ("terminate called without an
active exception") and the process dies with SIGABRT, exit 134, after committing everything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import random_proteins, write_fasta
from run_stops import stopped_after_first_commit
from worker_exits import slow_worker_exit

ROOT = Path(__file__).resolve().parents[1]
N = 40


def child_pids() -> set[int]:
    """This process's children, zombies (exited, not reaped) included."""
    me, out = str(os.getpid()), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # state, ppid, ...
            out.add(int(entry))
    return out


@pytest.fixture
def fasta(tmp_path):
    seqs = random_proteins([10 + (i * 11) % 60 for i in range(N)], seed=9)
    return write_fasta(tmp_path / "p.fa", [(f"p{i}", s) for i, s in enumerate(seqs)])


@pytest.fixture
def leftovers():
    """Threads and child processes that appeared during the test and are still there."""
    threads, children = set(threading.enumerate()), child_pids()

    def check():
        return ([t.name for t in threading.enumerate() if t not in threads and t.is_alive()],
                sorted(child_pids() - children))
    return check


def _config(fasta, model, out, **extra):
    from gpuengine.config import EmbedConfig

    return EmbedConfig(inputs=(fasta,), model=str(model), out=out, max_tokens=96,
                       commit_every=4, input_process=True, **extra)


@pytest.mark.parametrize("path", ["complete", "interrupted", "device error", "input error"])
def test_no_thread_or_child_process_outlives_run_embed(fasta, tiny_pt, tmp_path, leftovers,
                                                        monkeypatch, path):
    from gpuengine import runner as runner_module
    from gpuengine.engine import run_embed
    from gpuengine.errors import DeviceError, InputError

    stop = threading.Event()
    progress = None
    if path == "device error":
        launches = iter(range(1_000_000))
        real_launch = runner_module.Runner.launch

        def launch(self, staged):
            if next(launches) == 3:
                raise RuntimeError("a device error on the fourth batch")
            return real_launch(self, staged)

        monkeypatch.setattr(runner_module.Runner, "launch", launch)
    if path == "input error":  # the input reader process exits without sending a chunk
        from gpuengine.inputs import InputProcess

        monkeypatch.setattr(InputProcess, "command", [
            sys.executable, "-c", "import sys, time; sys.stdin.buffer.read(); time.sleep(0.3); sys.exit(3)"])
    config = _config(fasta, tiny_pt, tmp_path / "s.lmdb")
    if path == "device error":
        with pytest.raises(DeviceError, match="fourth batch"):
            run_embed(config, progress, stop)
    elif path == "input error":
        with pytest.raises(InputError, match="exited with status 3"):
            run_embed(config, progress, stop)
    elif path == "interrupted":  # stopped from the committer, with batches left (run_stops)
        with stopped_after_first_commit(stop):
            summary = run_embed(config, progress, stop)
        assert summary.interrupted and 0 < summary.committed_records < N
    else:
        summary = run_embed(config, progress, stop)
        assert not summary.interrupted and summary.committed_records == N
    threads, children = leftovers()
    assert threads == [] and children == [], (threads, children)


def test_input_process_that_fails_to_start_leaves_no_child(fasta, leftovers):
    """An error after the child is spawned (here: a configuration that cannot be sent) kills
    and reaps it before the error reaches the caller, who has no object to close."""
    from gpuengine.inputs import InputProcess

    with pytest.raises(TypeError):
        InputProcess([fasta], {}, None, None, {"kind": object()}, 8)
    assert leftovers() == ([], [])


@pytest.mark.slow
def test_run_embed_waits_for_a_worker_still_inside_torch(fasta, tiny_pt, tmp_path, leftovers,
                                                         monkeypatch):
    from gpuengine.engine import run_embed
    from gpuengine.worker import DeviceWorker

    monkeypatch.setattr(DeviceWorker, "_run", slow_worker_exit(0.5))
    summary = run_embed(_config(fasta, tiny_pt, tmp_path / "s.lmdb"))
    assert summary.committed_records == N
    assert leftovers() == ([], [])


INJECTED = """
import sys
sys.path.insert(0, {tests!r})
from run_stops import stopped_after_first_commit
from worker_exits import slow_worker_exit
from gpuengine.worker import DeviceWorker
DeviceWorker._run = slow_worker_exit(1.0)
sys.argv = ["gpuengine", *sys.argv[1:]]
from gpuengine.cli import main
main()
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.mark.slow
def test_cli_exits_0_when_a_worker_is_still_inside_torch_at_the_end(fasta, tiny_pt, tmp_path):
    """Before the engine joined its workers this aborted every time (exit 134)."""
    script = INJECTED.format(tests=str(ROOT / "tests"))
    proc = subprocess.run([sys.executable, "-c", script, "embed", str(fasta), "--model",
                           str(tiny_pt), "--out", str(tmp_path / "s.lmdb"), "-q"],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "terminate called" not in proc.stderr


@pytest.mark.slow
def test_many_short_cli_runs_under_cpu_load_all_exit_0(tiny_pt, tmp_path):
    """Short ``gpuengine embed`` runs, fresh and into an existing store with another --table
    and --layers, while a busy process competes for the CPU: every one exits 0.
    GPUENGINE_STRESS_RUNS sets the number of pairs (default 8). Two pairs run at a time, so
    each run competes with the busy process and with another run (the exit race needs a
    worker thread descheduled: more contention than one run beside the busy process, and the
    16 runs take about half the time)."""
    from concurrent.futures import ThreadPoolExecutor

    from gpuengine import EmbeddingStore

    pairs = int(os.environ.get("GPUENGINE_STRESS_RUNS", "8"))
    seqs = random_proteins([20 + (i * 13) % 120 for i in range(120)], seed=3)
    fasta = write_fasta(tmp_path / "p.fa", [(f"p{i}", s) for i, s in enumerate(seqs)])

    def pair(i: int) -> list:
        """A fresh run, then a second table into its store; the failed runs."""
        failed = []
        base = [sys.executable, "-m", "gpuengine", "embed", str(fasta), "--model",
                str(tiny_pt), "--out", str(tmp_path / f"s{i}.lmdb"), "-q"]
        for args in ([], ["--table", "layer1", "--layers", "1"]):
            proc = subprocess.run(base + args, capture_output=True, text=True, env=_env(),
                                  cwd=ROOT, timeout=300)
            if proc.returncode != 0:
                failed.append((i, args, proc.returncode, proc.stderr[-2000:]))
        return failed

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            failures = [f for failed in pool.map(pair, range(pairs)) for f in failed]
    finally:
        busy.kill()
        busy.wait()
    assert failures == []
    for i in range(pairs):
        with EmbeddingStore(tmp_path / f"s{i}.lmdb", table="layer1") as store:
            assert len(store) == len(seqs)
