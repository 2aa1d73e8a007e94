"""gpuengine.preload: a model read, hashed and built ahead into a ReplicaPool, used once by the
run, errors left to the run; and the pool's per-model read lock."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from gpuengine.config import EmbedConfig, environment
from gpuengine.preload import ModelPreload
from gpuengine.replicas import ModelChoice, ReplicaPool, build_model
from gpuengine.workflows.virnucpro import pipeline
from virnucpro_files import reads_fasta


def esm_config(model, tmp_path) -> EmbedConfig:
    return EmbedConfig(inputs=(tmp_path / "x.fa",), model=str(model), out=tmp_path / "s.lmdb",
                       layers=(-1,), pools=("mean",), table="esm", devices="cpu",
                       allow_download=False, env=environment())


def test_preload_reads_hashes_and_builds_once(predict_models, tmp_path, monkeypatch):
    monkeypatch.setenv("GPUENGINE_CACHE", str(tmp_path / "cache"))
    esm = predict_models[0]
    config = esm_config(esm, tmp_path)
    pool = ReplicaPool()
    preload = ModelPreload(config, pool, builds=2)
    preload.start()
    preload.wait()
    assert preload.error is None and preload.built == 2 and preload.seconds > 0
    choice = ModelChoice.resolve(config)
    assert pool.has_weights(choice.weights_key())
    weights = pool.weights(choice.weights_key(), lambda: pytest.fail("read again"))
    hashed = []
    import gpuengine.models.sources as sources
    real_update = sources.hashlib.sha256
    monkeypatch.setattr(sources.hashlib, "sha256", lambda *a: hashed.append(a) or real_update(*a))
    choice.checksum(config.env.cache_dir)
    assert len(hashed) == 1  # only the cache key: the file's sha256 was cached by the preload
    first = build_model(choice.fam, weights, torch.float32, pool)
    second = build_model(choice.fam, weights, torch.float32, pool)
    assert first is not second and pool.take_built(weights, torch.float32) is None
    fresh = choice.fam.build(weights, torch.float32)
    for a, b in zip(first.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    # a second preload into the same pool builds nothing (a warm daemon has its replicas)
    again = ModelPreload(config, pool)
    again.start()
    again.wait()
    assert again.error is None and again.built == 0


def test_a_failing_preload_is_left_to_the_run(tmp_path):
    pool = ReplicaPool()
    preload = ModelPreload(esm_config(tmp_path / "missing.pt", tmp_path), pool)
    preload.start()
    assert preload.wait() >= 0
    assert preload.error is not None and preload.built == 0
    ModelPreload(esm_config(tmp_path / "never.pt", tmp_path), pool).wait()  # never started


def test_one_model_being_read_does_not_hold_up_another():
    pool = ReplicaPool()
    release, entered = threading.Event(), threading.Event()

    def slow():
        entered.set()
        release.wait(10)
        return "slow"

    thread = threading.Thread(target=pool.weights, args=("a", slow))
    thread.start()
    try:
        assert entered.wait(10)
        got = []
        other = threading.Thread(target=lambda: got.append(pool.weights("b", lambda: "fast")))
        other.start()
        other.join(5)
        assert got == ["fast"]  # not held up by "a", still being read
        assert not pool.has_weights("a")
    finally:
        release.set()
        thread.join()
        other.join()
    assert pool.weights("a", lambda: pytest.fail("read twice")) == "slow"


def test_predict_reports_the_preloads_and_leaves_no_built_model(predict_models, tmp_path):
    esm, dna, _, mlp_path = predict_models
    reads_fasta(tmp_path / "reads.fasta", n=8)
    pool = ReplicaPool()
    config = pipeline.PredictConfig(reads=tmp_path / "reads.fasta", length=500,
                                    classifier=mlp_path, esm_model=str(esm),
                                    dnabert_model=str(dna), out=tmp_path / "out",
                                    devices="cpu", allow_download=False)
    summary = pipeline.run_predict(config, replicas=pool)
    assert set(summary.preload_seconds) == {"dnabert", "esm"}
    assert set(summary.preload_wait_seconds) == {"dnabert", "esm"}
    assert not pool._built  # each built model was taken by its stage (or dropped)
    assert (Path(config.out_dir) / "prediction_results.txt").exists()
