"""predict at fp8 (FP8's CPU path, as tests/test_replicas_fp8.py runs it): the ESM-2 replica
and the guard's fp16 reference are the two models the preload built, and the guard's sample
is picked directly (no full pass over the frames), with the guard's usual measurement."""

from __future__ import annotations

import functools

import pytest
import torch

from fp8_helpers import needs_cpu_fp8
from gpuengine import engine, replicas
from gpuengine.models import fp8
from gpuengine.replicas import ReplicaPool
from gpuengine.workflows.virnucpro import pipeline
from virnucpro_files import reads_fasta


@pytest.fixture(autouse=True)
def _torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@needs_cpu_fp8
def test_fp8_predict_uses_the_preloaded_models_and_the_picked_sample(
        predict_models, tmp_path, monkeypatch):
    esm, dna, _, mlp_path = predict_models
    made, built, picks = [], [], []
    real_make = functools.partial(replicas._make_runner, fp8_on_cpu=True)

    def make(config, fam, model, device, precision, outputs, **options):
        made.append((config.table, precision, id(model)))
        return real_make(config, fam, model, device, precision, outputs, **options)

    real_put, real_pick = ReplicaPool.put_built, pipeline._pick_frames
    monkeypatch.setattr(replicas, "_make_runner", make)
    monkeypatch.setattr(engine, "check_precision", lambda *args: None)
    monkeypatch.setattr(fp8, "check_fp8_run", lambda *args: None)
    monkeypatch.setattr(ReplicaPool, "put_built", lambda self, w, dtype, model: (
        built.append(id(model)), real_put(self, w, dtype, model)))
    monkeypatch.setattr(pipeline, "_pick_frames",
                        lambda *args: picks.append(args[-1]) or real_pick(*args))
    reads_fasta(tmp_path / "reads.fasta", n=24)
    pool = ReplicaPool()
    config = pipeline.PredictConfig(reads=tmp_path / "reads.fasta", length=500,
                                    classifier=mlp_path, esm_model=str(esm),
                                    dnabert_model=str(dna), out=tmp_path / "out",
                                    devices="cpu", allow_download=False, precision="fp8")
    summary = pipeline.run_predict(config, replicas=pool)
    fidelity = summary.embed["esm"]["fidelity"]
    assert fidelity["passed"] and fidelity["sequences"] == min(256, summary.frames)
    assert len(picks) == 1 and len(picks[0]) == fidelity["sequences"]
    esm_models = [(precision, model) for table, precision, model in made if table == "esm"]
    assert [p for p, _ in esm_models] == ["fp8", "fp16"]  # the replica, the guard's reference
    # every model a runner was made of was built ahead: DNABERT-S's, and ESM-2's two
    assert len(built) == 3 and {model for _, _, model in made} == set(built)
    assert not pool._built
