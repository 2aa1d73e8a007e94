"""Model replicas (gpuengine/replicas.py): built once per device and kept in a ReplicaPool across
runs (the daemon and ``predict`` hand one pool to every run, so models load once per process),
and the run's precision. The telemetry's side of the budgets is in test_budget.py; whole runs
with replicas are in test_engine.py and test_engine_faults.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import write_fasta
from gpuengine import replicas as replicas_module
from gpuengine.config import EmbedConfig
from gpuengine.progress import NullProgress
from gpuengine.replicas import ModelChoice, ReplicaPool, build_replicas, run_precision
from gpuengine.run_store import table_spec


@pytest.fixture
def config(tiny_pt, tmp_path) -> EmbedConfig:
    fasta = write_fasta(tmp_path / "p.fa", [("p1", "MKTAYIAKQR")])
    return EmbedConfig(inputs=(fasta,), model=str(tiny_pt), out=tmp_path / "s.lmdb", devices="cpu",
                       layers=(-1,), pools=("mean",), max_tokens=4096)


def build(config: EmbedConfig, pool: ReplicaPool | None, precision: str = "fp32"):
    model = ModelChoice.resolve(config)
    weights = model.read_weights(pool)
    spec = table_spec(config, model.fam, weights, "ab" * 32, model.max_residues, precision)
    return weights, build_replicas(config, model.fam, weights, spec, NullProgress(), pool=pool)


def test_a_pool_reads_weights_once_and_reuses_the_replica(config, monkeypatch):
    made = []
    real = replicas_module._make_runner
    monkeypatch.setattr(replicas_module, "_make_runner", lambda *a: made.append(a) or real(*a))
    pool = ReplicaPool()
    weights1, (first,) = build(config, pool)
    weights2, (second,) = build(config, pool)
    assert weights2 is weights1 and second is first and len(made) == 1
    # another precision is another replica (of the same host-side weights)
    weights3, (third,) = build(config, pool, precision="bf16")
    assert weights3 is weights1 and third is not first and len(made) == 2
    assert third.runner.precision == "bf16"
    pool.clear()
    _, (fourth,) = build(config, pool)
    assert fourth is not first and len(made) == 3


def test_without_a_pool_every_run_builds_its_own(config):
    _, (first,) = build(config, None)
    _, (second,) = build(config, None)
    assert second is not first and second.runner is not first.runner
    assert first.memory is None  # telemetry is for GPUs
    assert first.budget.tokens() == 4096  # --max-tokens caps the CPU's budget


def test_the_run_precision_is_the_option_else_the_devices_default(config, monkeypatch):
    fam = ModelChoice.resolve(config).fam
    assert run_precision(config, fam)[0] == "fp32"
    assert "CPU" in run_precision(config, fam)[1]
    assert run_precision(replace(config, precision="bf16"), fam) == ("bf16", "")
    monkeypatch.setattr(replicas_module, "parse_devices", lambda spec: [torch.device("cuda", 0)])
    assert run_precision(config, fam) == ("fp16", " (the default on the GPU, as no "
                                                  "--precision was given)")
