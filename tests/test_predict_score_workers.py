"""The score stage in worker processes (gpuengine.workflows.virnucpro.scoring): the same output
bytes as scoring in this process, a missing feature still named, and the worker count rule."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from gpuengine.errors import ModelLoadError
from gpuengine.workflows.virnucpro import pipeline
from gpuengine.workflows.virnucpro.outputs import (CONSENSUS_FILE, PREDICTIONS_FILE,
                                                   READ_SUMMARY_FILE)
from gpuengine.workflows.virnucpro.scoring import MAX_SCORE_WORKERS, score_workers
from virnucpro_files import reads_fasta

OUTPUTS = (PREDICTIONS_FILE, CONSENSUS_FILE, READ_SUMMARY_FILE)


def digests(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in OUTPUTS}


@pytest.fixture
def embedded(tmp_path, predict_models, monkeypatch):
    """A predict run of 30 reads (in blocks of 7 reads) scored in this process, and its
    config."""
    esm, dna, _, mlp_path = predict_models
    monkeypatch.setattr(pipeline, "READ_BLOCK", 7)
    reads_fasta(tmp_path / "reads.fasta", n=30)
    config = pipeline.PredictConfig(reads=tmp_path / "reads.fasta", length=500,
                                    classifier=mlp_path, esm_model=str(esm),
                                    dnabert_model=str(dna), out=tmp_path / "inline",
                                    devices="cpu", allow_download=False, score_workers=0)
    summary = pipeline.run_predict(config)
    assert summary.score_workers == 0 and summary.frames > 0
    return config


def test_worker_processes_write_the_same_bytes(embedded, tmp_path):
    pooled = dataclasses.replace(embedded, out=tmp_path / "pooled", store=embedded.store_path,
                                 score_only=True, score_workers=2)
    summary = pipeline.run_predict(pooled)
    assert summary.score_workers == 2
    assert digests(tmp_path / "pooled") == digests(tmp_path / "inline")
    assert (tmp_path / "pooled" / PREDICTIONS_FILE).read_text().count("\n") == summary.frames + 1


def test_a_missing_feature_is_named_from_a_worker(embedded, tmp_path):
    """Reads beyond the 30 embedded: their frames have no features in the store."""
    reads_fasta(tmp_path / "more.fasta", n=40)  # the same first 30 reads (same seed)
    pooled = dataclasses.replace(embedded, reads=tmp_path / "more.fasta", out=tmp_path / "more",
                                 store=embedded.store_path, score_only=True, score_workers=2)
    with pytest.raises(ModelLoadError, match=r"frame 'read3\d_chunk_1F\d' has no DNABERT-S "
                                             "embedding in the store"):
        pipeline.run_predict(pooled)


def test_worker_count_rule(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert score_workers(None, 50) == MAX_SCORE_WORKERS
    assert score_workers(None, 3) == 3
    assert score_workers(None, 1) == 0  # one block: nothing to spread
    assert score_workers(0, 50) == 0 and score_workers(5, 50) == 5
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert score_workers(None, 50) == 0  # two cores: the workers would only share them
