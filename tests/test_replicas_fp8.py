"""``--precision fp8 --replicas-per-gpu R``: the replicas of a device share one model whose
weights are quantized to e4m3 once (by the first runner of it), never twice, and the fidelity
guard measures the first replica, against an fp16 reference of its own that is dropped after.

The engine runs the CPU's eager FP8 path (the reference the GPU kernels are tested against):
the runs below build their runners through the replicas module's own ``_make_runner`` with
``fp8_on_cpu`` (the one thing a test changes), and ``check_precision``, which refuses fp8 on
a device without FP8 GEMMs, is skipped. The GPU side is in test_replicas_gpu.py and
test_fp8_gpu.py (``-m gpu``)."""

from __future__ import annotations

import functools
import gc
import weakref

import numpy as np
import pytest
import torch

from conftest import random_proteins, write_fasta
from gpuengine import engine, replicas
from gpuengine.config import EmbedConfig
from gpuengine.errors import UsageError
from gpuengine.models import fp8
from gpuengine.models.esm2_weights import build_esm2, read_fair_esm_checkpoint
from gpuengine.store.schema import OutputSpec
from gpuengine.pooling import PoolingRule
from gpuengine.runner import Runner
from gpuengine.store.reader import EmbeddingStore
from fp8_helpers import needs_cpu_fp8, weights  # noqa: F401  (fixture)

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _torch_threads():
    """The engine sets torch's thread count process-wide (each replica's share): restore it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu_fp8_engine(monkeypatch):
    """The engine's own runners with FP8's CPU path allowed; records every model a runner was
    made of (precision, model) and every layer quantized."""
    made, quantized = [], []
    real_make = functools.partial(replicas._make_runner, fp8_on_cpu=True)

    def make(config, fam, model, device, precision, outputs, **options):
        made.append((precision, weakref.ref(model), id(model), options))
        return real_make(config, fam, model, device, precision, outputs, **options)

    real_quantize = fp8._quantize_layer
    monkeypatch.setattr(replicas, "_make_runner", make)
    monkeypatch.setattr(engine, "check_precision", lambda *args: None)
    monkeypatch.setattr(fp8, "_quantize_layer",
                        lambda layer, layout: quantized.append(layer) or real_quantize(layer,
                                                                                       layout))
    return made, quantized


def _run(checkpoint, fasta, out, replicas_per_gpu, threads):
    config = EmbedConfig(inputs=(fasta,), model=str(checkpoint), out=out, devices="cpu",
                         precision="fp8", max_tokens=8, replicas_per_gpu=replicas_per_gpu,
                         threads=threads)
    summary = engine.run_embed(config)
    with EmbeddingStore(out) as store:
        assert store.spec.precision == "fp8"
        return summary, dict(store.items())


@needs_cpu_fp8
def test_fp8_replicas_share_one_quantized_copy_and_store_what_one_stores(
        weights, cpu_fp8_engine, tmp_path):  # noqa: F811
    """With --max-tokens 8 every batch holds one sequence, so R = 1 and R = 2 compute the same
    batches (one thread each) and must agree bit for bit; the two replicas quantize the two
    layers once between them, and the guard's fp16 reference is a model of its own, built after
    both replicas and gone once the run is over."""
    made, quantized = cpu_fp8_engine
    seqs = random_proteins([5 + (i * 29) % 140 for i in range(48)], seed=7)
    ids = [f"r{i:03d}" for i in range(len(seqs))]
    fasta = write_fasta(tmp_path / "in.fa", list(zip(ids, seqs)))
    layers = 2  # fp8_helpers' checkpoints

    one, a = _run(weights["plain"], fasta, tmp_path / "one.lmdb", 1, 1)
    assert len(quantized) == layers and [p for p, *_ in made] == ["fp8", "fp16"]
    made.clear(), quantized.clear()
    two, b = _run(weights["plain"], fasta, tmp_path / "two.lmdb", 2, 2)

    # one model for both replicas, quantized once; then the guard's own fp16 reference
    assert [p for p, *_ in made] == ["fp8", "fp8", "fp16"]
    assert made[0][2] == made[1][2] != made[2][2]
    # the reference runs the exact eager layers (no kernels compiled for it); the replicas the run's
    assert made[2][3] == {"compile": False} and made[0][3] == made[1][3] == {}
    assert len(quantized) == layers and len({id(layer) for layer in quantized}) == layers
    gc.collect()
    assert made[2][1]() is None, "the guard's fp16 reference was dropped"
    assert made[0][1]() is None, "nothing keeps the replicas' model after the run"

    assert sorted(a) == sorted(b) == sorted(ids)
    assert one.embedded == two.embedded == len(ids) and two.exit_code == 0
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in ids)
    assert worst == 0.0, worst
    assert [d["device"] for d in two.devices] == ["cpu#0", "cpu#1"]
    assert all(d["batches"] > 0 for d in two.devices), two.devices
    # the guard measured the same quantized model, on the first replica, once per run
    assert two.fidelity["passed"] and two.fidelity["sequences"] == one.fidelity["sequences"]
    assert two.fidelity["min_cosine"] == one.fidelity["min_cosine"] < 0.99999


def _fp8_model(checkpoint):
    cfg, state, _ = read_fair_esm_checkpoint(checkpoint)
    return build_esm2(cfg, state, torch.float16)


def _runner(model, config=None):
    return Runner(model, CPU, "fp8", [OutputSpec(2, "mean")], PoolingRule(1, 1), fp8=config,
                  fp8_on_cpu=True)


@needs_cpu_fp8
def test_a_later_runner_of_a_quantized_model_quantizes_nothing(weights, monkeypatch):  # noqa: F811
    """The second runner of one model (a device's second replica) runs the first one's e4m3
    buffers: the same tensors, no weight quantized again; a runner asking for other FP8 GEMMs
    than the model was quantized for is refused, as is quantizing the model again."""
    model = _fp8_model(weights["plain"])
    first = _runner(model)
    layer = model.layers[0]
    buffers = {name: getattr(layer, f"{name}_fp8") for name in fp8.DEFAULT_FP8.gemms}
    calls = []
    real = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda x: calls.append(x) or real(x))
    second = _runner(model)
    assert calls == [], "nothing quantized for the second runner"
    assert second.model is first.model and second.kernels == first.kernels == "fp8-eager"
    for name, tensor in buffers.items():
        assert getattr(layer, f"{name}_fp8") is tensor
        assert getattr(layer, name).weight.numel() == 0, "the fp16 weight stays freed"
    with pytest.raises(UsageError, match="quantized to FP8 for qkv,fc1,fc2, not qkv,out_proj"):
        _runner(model, fp8.Fp8Config(frozenset(fp8.GEMMS)))
    with pytest.raises(UsageError, match="already quantized"):
        fp8.enable_fp8(model, CPU, allow_cpu=True)
