"""``--replicas-per-gpu``: several replicas per device, fed by the one scheduler (CPU; the
replicas module's pool and precision are in test_replicas.py, the GPU runs in
test_replicas_gpu.py).

* R = 2 on the CPU stores what R = 1 stores (same ids; vectors within fp32 rounding, and
  bit for bit when every batch holds one sequence, so both runs compute the same batches);
* the summary and the progress name each replica (``cpu#0``, ``cpu#1``) with its share;
* (test_engine_faults.py) an out-of-memory error injected into one replica is recovered
  without losing or duplicating a sequence, and lowers only that replica's budget;
* a real ``gpuengine embed --replicas-per-gpu 2`` process killed with SIGKILL and rerun
  stores every sequence exactly once (the helpers of ``embed_processes``);
* the replicas of one GPU share its memory: with a fake device (NVML probe and allocator),
  their budgets sum to at most the device's usable memory, follow it when another process
  takes some, and each replica warms up in turn at its share, seeing the others' memory.
"""

from __future__ import annotations

import io
import re
import signal

import numpy as np
import pytest
import torch

from conftest import random_proteins, write_fasta
from gpuengine.budget import TokenBudget
from gpuengine.config import EmbedConfig
from gpuengine.engine import run_embed
from gpuengine.errors import UsageError
from gpuengine.store.reader import EmbeddingStore
from embed_processes import (N, check_store, command, kill_after_first_commit,
                             rerun_to_completion, run_records)
from fake_gpu import GIB, device_group as _group, install


@pytest.fixture(autouse=True)
def _torch_threads():
    """The engine sets torch's thread count process-wide (each replica's share): restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _fasta(tmp_path, n=160, seed=5):
    seqs = random_proteins([5 + (i * 29) % 140 for i in range(n)], seed=seed)
    ids = [f"r{i:04d}" for i in range(n)]
    return write_fasta(tmp_path / "in.fa", list(zip(ids, seqs))), ids


def _run(tiny_pt, fasta, out, replicas, threads, **options):
    config = EmbedConfig(inputs=(fasta,), model=str(tiny_pt), out=out, devices="cpu",
                         replicas_per_gpu=replicas, threads=threads, **options)
    summary = run_embed(config)
    with EmbeddingStore(out) as store:
        return summary, dict(store.items())


@pytest.mark.parametrize("max_tokens,tol", [(512, 1e-6), (8, 0.0)])
def test_two_cpu_replicas_store_what_one_stores(tiny_pt, tmp_path, max_tokens, tol):
    """Batches of up to 512 tokens may be packed differently with two replicas pulling from
    the scheduler (fp32 rounding differs by 1e-7); with --max-tokens 8 every batch holds one
    sequence, both runs compute identical batches with one thread each, and agree exactly."""
    fasta, ids = _fasta(tmp_path)
    one, a = _run(tiny_pt, fasta, tmp_path / "one.lmdb", 1, 1, max_tokens=max_tokens)
    two, b = _run(tiny_pt, fasta, tmp_path / "two.lmdb", 2, 2, max_tokens=max_tokens)
    assert sorted(a) == sorted(b) == sorted(ids)
    assert one.embedded == two.embedded == len(ids) and two.exit_code == 0
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in ids)
    assert worst <= tol, worst
    assert [d["device"] for d in one.devices] == ["cpu"]
    assert [d["device"] for d in two.devices] == ["cpu#0", "cpu#1"]
    assert all(d["batches"] > 0 for d in two.devices), two.devices
    assert sum(d["sequences"] for d in two.devices) == len(ids)
    assert sum(d["share"] for d in two.devices) == pytest.approx(1.0)
    assert torch.get_num_threads() == 1  # 2 threads split between 2 replicas


def test_summary_and_progress_show_each_replica_and_its_share(tiny_pt, tmp_path):
    from rich.console import Console

    from gpuengine.display import RichProgress, print_summary
    from gpuengine.progress import ProgressSnapshot

    fasta, ids = _fasta(tmp_path, n=80)
    summary, _ = _run(tiny_pt, fasta, tmp_path / "s.lmdb", 2, 2, max_tokens=256)
    buf = io.StringIO()
    print_summary(summary, Console(file=buf, width=220, color_system=None))
    text = buf.getvalue()
    for dev in summary.devices:
        share = f"share {dev['share']:.0%}, budget {dev['budget_tokens']:,}"
        line = next(row for row in text.splitlines() if f"{dev['device']} " in row)
        assert f"{dev['sequences']:,} seq" in line and share in line, line
    assert "cuda:0#1: the second replica on GPU 0" in " ".join(text.split())

    from gpuengine.progress import DeviceProgress

    buf = io.StringIO()
    bar = RichProgress(console=Console(file=buf, width=200, force_terminal=True,
                                       color_system=None))
    devices = (DeviceProgress("cuda:0#0", 3000.0, 4096, 0.9),
               DeviceProgress("cuda:0#1", 1000.0, 2048, 0.5))
    bar.start(10, 100)
    bar.update(ProgressSnapshot(5, 10, 4000, 1.0, devices))
    bar.close()
    rows = [line for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue()).splitlines()
            if "cuda:0#" in line]
    assert any("cuda:0#0" in r and "3,000 tok/s" in r and "share 75%" in r for r in rows), rows
    assert any("cuda:0#1" in r and "budget 2,048" in r and "share 25%" in r for r in rows), rows


def test_replicas_per_gpu_is_checked(tmp_path):
    with pytest.raises(UsageError, match="--replicas-per-gpu must be 1 to 16"):
        EmbedConfig(inputs=(tmp_path / "x.fa",), model="m", out=tmp_path / "s",
                    replicas_per_gpu=0)


@pytest.mark.slow
def test_sigkill_with_two_replicas_then_rerun_stores_each_sequence_once(tiny_pt, tmp_path,
                                                                        resume_workload):
    out = tmp_path / "store.lmdb"
    workload = resume_workload
    cmd = command(workload["fasta"], tiny_pt, out) + ["--gpus", "cpu", "--replicas-per-gpu", "2"]
    proc, _ = kill_after_first_commit(cmd, out, tmp_path / "killed")
    assert proc.returncode == -signal.SIGKILL
    stored = len(check_store(out, workload))
    assert 0 < stored < N, f"{stored} of {N} records stored at the kill"
    summary = rerun_to_completion(cmd, out, stored, workload)
    assert [d["device"] for d in summary["devices"]] == ["cpu#0", "cpu#1"]
    [run] = run_records(out)
    assert run["status"] == "complete" and run["committed_records"] == N


# ----------------------------------------------------------------------------- shared memory


@pytest.fixture
def fake_gpu(monkeypatch):
    return install(monkeypatch)


def test_replica_budgets_on_one_gpu_sum_to_at_most_its_usable_memory(fake_gpu):
    from gpuengine.devices import GPU_MARGIN_BYTES

    per_token = 200_000
    group = _group(fake_gpu, 3, per_token, estimate=150_000, max_tokens=1 << 20)
    memory = group[0].memory
    assert all(r.memory is memory for r in group) and [r.name for r in group] == memory.names
    memory.refresh()
    usable = fake_gpu.free() + fake_gpu.reserved() - fake_gpu.weights - GPU_MARGIN_BYTES
    assert memory.usable_bytes == usable
    tokens = [r.budget.tokens() for r in group]
    assert len(set(tokens)) == 1 and sum(tokens) * per_token <= usable
    assert sum(tokens) * per_token > 0.99 * usable  # and not much less: equal shares of it
    described = memory.describe()
    assert [r["name"] for r in described["replicas"]] == ["cuda:0#0", "cuda:0#1", "cuda:0#2"]
    assert described["budget_tokens"] == sum(tokens)

    fake_gpu.other = 40 * GIB  # another process takes half the card: every share shrinks
    memory.refresh()
    smaller = [r.budget.tokens() for r in group]
    assert sum(smaller) * per_token <= memory.usable_bytes < usable - 39 * GIB
    assert all(s < t for s, t in zip(smaller, tokens))

    group[1].budget.after_oom(smaller[1])  # an OOM in replica 1 lowers its budget alone
    memory.refresh()
    assert group[1].budget.tokens() < smaller[1]
    assert [group[0].budget.tokens(), group[2].budget.tokens()] == [smaller[0], smaller[2]]


def test_a_single_replica_gets_the_whole_device(fake_gpu):
    group = _group(fake_gpu, 1, 200_000, estimate=250_000, max_tokens=1 << 20)
    memory = group[0].memory
    assert memory.share_tokens() == memory.usable_bytes // memory.bytes_per_token
    assert group[0].budget.tokens() == memory.share_tokens()
    assert "replicas" in memory.describe() and "learned_cap" in memory.describe()


def test_replicas_warm_up_in_turn_at_their_share_seeing_the_others_memory(fake_gpu):
    """The estimate is too low (real activations take 4/3 of it): each replica calibrates
    alone at its share of what is free after the ones before it warmed up, none runs out of
    memory, and the shares end at the calibrated figure."""
    fake_gpu.total = 24 * GIB
    per_token = 200_000
    group = _group(fake_gpu, 2, per_token, estimate=150_000, max_tokens=1 << 20)
    (first, t0, free0), (second, t1, free1) = fake_gpu.log
    assert (first, second) == (0, 1)
    assert free1 < free0 - t0 * per_token * 0.99  # the first replica's cache shows as used
    assert t1 <= t0  # the second's share is sized by the calibrated (larger) figure
    memory = group[0].memory
    assert memory.bytes_per_token == per_token
    memory.refresh()
    assert sum(r.budget.tokens() for r in group) * per_token <= memory.usable_bytes


def test_peaks_raise_bytes_per_token_over_the_replicas_largest_batches(fake_gpu):
    group = _group(fake_gpu, 2, 100_000, estimate=100_000, max_tokens=1 << 20)
    memory = group[0].memory
    memory.refresh()
    group[0].budget.after_success(10_000)
    group[1].budget.after_success(30_000)
    fake_gpu.peak = fake_gpu.weights + 40_000 * 150_000  # both at once, 1.5x the figure
    memory.refresh()
    assert memory.bytes_per_token == 150_000
    group[0].budget.after_success(10_000)  # a lower figure never lowers it
    fake_gpu.peak = fake_gpu.weights + 10_000 * 50_000
    memory.refresh()
    assert memory.bytes_per_token == 150_000


def test_cpu_threads_are_split_among_replicas_and_given_back():
    from gpuengine.replicas import split_cpu_threads

    torch.set_num_threads(4)
    split_cpu_threads(None, 2)
    assert torch.get_num_threads() == 2
    split_cpu_threads(None, 2)  # a second run of two replicas: still half of the 4
    assert torch.get_num_threads() == 2
    split_cpu_threads(None, 1)  # then one replica: all 4 again
    assert torch.get_num_threads() == 4
    split_cpu_threads(6, 4)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(3)  # the caller's own setting is left alone
    split_cpu_threads(None, 1)
    assert torch.get_num_threads() == 3


def test_a_pool_keeps_each_device_group_and_reports_its_memory_once(fake_gpu):
    from gpuengine.replicas import ReplicaPool

    pool = ReplicaPool()
    group = _group(fake_gpu, 2, 100_000, estimate=100_000, max_tokens=None)
    pool.put("k", group)
    assert pool.get("k") is group and pool.memories() == [group[0].memory]
    assert all(r.budget.tokens() <= 65_536 for r in group)  # the GPU default maximum
    assert isinstance(group[0].budget, TokenBudget)
