"""``--replicas-per-gpu`` on a real GPU (``pytest -m gpu``): the stand-in for "two GPUs equal
one" until a machine with two is lent.

* two replicas on GPU 0 store what one stores (same ids; fp16 cosine ≥ 0.99999 per vector);
* an out-of-memory error injected into the second replica is recovered: nothing lost or
  stored twice, only that replica's budget drops;
* the summary names each replica with its share, and the device's memory telemetry holds
  both budgets, which together stay within its usable memory.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from conftest import random_proteins, write_fasta
from gpuengine.synthetic import write_fair_esm_checkpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

N = 300


@pytest.fixture(scope="module")
def gpu_pt(tmp_path_factory):
    return write_fair_esm_checkpoint(tmp_path_factory.mktemp("w") / "esm2_t4_rep.pt", 4, 128, 4,
                                     seed=5)


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    seqs = random_proteins([30 + (i * 37) % 900 for i in range(N)], seed=4)
    return write_fasta(tmp_path_factory.mktemp("in") / "in.fa",
                       [(f"s{i}", s) for i, s in enumerate(seqs)])


def _run(gpu_pt, fasta, out, replicas, runner_factory=None):
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed
    from gpuengine.store.reader import EmbeddingStore

    config = EmbedConfig(inputs=(fasta,), model=str(gpu_pt), out=out, devices="0",
                         precision="fp16", max_tokens=4096, replicas_per_gpu=replicas)
    summary = run_embed(config, runner_factory=runner_factory)
    with EmbeddingStore(out) as store:
        return summary, dict(store.items())


@pytest.fixture(scope="module")
def one_replica(gpu_pt, fasta, tmp_path_factory):
    return _run(gpu_pt, fasta, tmp_path_factory.mktemp("one") / "s.lmdb", 1)


def _cosines(a: dict, b: dict) -> np.ndarray:
    keys = sorted(a)
    x, y = np.stack([a[k] for k in keys]), np.stack([b[k] for k in keys])
    return (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))


def test_two_replicas_on_one_gpu_store_what_one_stores(gpu_pt, fasta, tmp_path, one_replica):
    from rich.console import Console

    from gpuengine.display import print_summary

    one, a = one_replica
    two, b = _run(gpu_pt, fasta, tmp_path / "two.lmdb", 2)
    assert one.exit_code == two.exit_code == 0
    assert sorted(a) == sorted(b) and len(b) == N
    assert _cosines(a, b).min() >= 0.99999
    names = [d["device"] for d in two.devices]
    assert names == ["cuda:0#0", "cuda:0#1"]
    assert all(d["batches"] > 0 for d in two.devices), two.devices
    assert sum(d["share"] for d in two.devices) == pytest.approx(1.0)
    buf = io.StringIO()
    print_summary(two, Console(file=buf, width=220, color_system=None))
    text = buf.getvalue()
    for dev in two.devices:
        assert f"share {dev['share']:.0%}, budget {dev['budget_tokens']:,}" in text, text


def test_the_replicas_of_a_gpu_split_its_memory(gpu_pt, fasta, tmp_path):
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed
    from gpuengine.replicas import ReplicaPool

    pool = ReplicaPool()
    config = EmbedConfig(inputs=(fasta,), model=str(gpu_pt), out=tmp_path / "s.lmdb",
                         devices="0", precision="fp16", replicas_per_gpu=2)
    assert run_embed(config, replicas=pool).exit_code == 0
    [memory] = pool.memories()
    memory.refresh()
    described = memory.describe()
    assert [r["name"] for r in described["replicas"]] == ["cuda:0#0", "cuda:0#1"]
    shares = [b.describe()["memory_tokens"] for b in memory.budgets]
    assert shares[0] == shares[1] == memory.share_tokens()
    assert sum(shares) * memory.bytes_per_token <= memory.usable_bytes
    assert memory.usable_bytes <= memory.free_bytes + torch.cuda.memory_reserved(0)
    pool.clear()


def test_an_oom_in_one_replica_is_recovered_without_loss(gpu_pt, fasta, tmp_path, one_replica):
    """The second replica's first three launches above 1000 tokens raise CUDA OOM: the
    scheduler splits and requeues, that replica's budget drops, the other's does not, and
    every record is committed exactly once with the vectors of the one-replica run."""
    from gpuengine.models.esm2_weights import build_esm2, read_fair_esm_checkpoint
    from gpuengine.models.registry import family
    from gpuengine.runner import Runner

    made, state = [], {"ooms": 0}
    cfg, weights, _ = read_fair_esm_checkpoint(gpu_pt)
    model = build_esm2(cfg, weights, torch.float16)  # shared, as the engine shares it

    def factory(device, precision, outputs):
        runner = Runner(model, device, precision, outputs, family("esm2").pooling_rule)
        index, real = len(made), runner.launch
        made.append(runner)

        def launch(staged):
            warm_up = staged.items[0].digest == bytes(16)  # Runner.synthetic_items
            if index == 1 and not warm_up and staged.total > 1000 and state["ooms"] < 3:
                state["ooms"] += 1
                raise torch.cuda.OutOfMemoryError("injected")
            return real(staged)

        runner.launch = launch
        return runner

    summary, vectors = _run(gpu_pt, fasta, tmp_path / "oom.lmdb", 2, runner_factory=factory)
    assert len(made) == 2 and state["ooms"] == 3 and summary.exit_code == 0
    assert [d["oom_events"] for d in summary.devices] == [0, 3]
    assert summary.devices[0]["budget_tokens"] == 4096 > summary.devices[1]["budget_tokens"]
    assert summary.committed_records == N and not summary.failed
    _, clean = one_replica
    assert sorted(vectors) == sorted(clean)  # every id once, none lost
    assert _cosines(vectors, clean).min() >= 0.99999
