"""The hold of held_process.py, in process: a held run takes its first batches and one more,
commits the first ones, takes nothing more until it is stopped and then drains the held
batch; a run too small to hold completes; a held run nobody stops fails after the bound,
saying why, instead of hanging; a held merge writes its first chunks of vectors and waits
for its stop."""

from __future__ import annotations

import threading

import pytest

import held_process
from conftest import random_proteins, write_fasta
from gpuengine.committer import Committer
from gpuengine.config import EmbedConfig
from gpuengine.engine import run_embed
from gpuengine.errors import DeviceError
from gpuengine.worker import DeviceWorker

BATCHES = held_process.BATCHES


@pytest.fixture
def held(monkeypatch):
    """Hold runs after BATCHES batches; the batches' sizes as taken, and an event set once
    the first transaction is durable."""
    taken: list[int] = []
    first_commit = threading.Event()
    real_next_batch, real_commit = DeviceWorker._next_batch, Committer._commit

    def counted(self, wait):
        batch = real_next_batch(self, wait)
        if batch is not None:
            taken.append(len(batch.items))
        return batch

    def commit(self, *args, **kwargs):
        real_commit(self, *args, **kwargs)
        first_commit.set()

    monkeypatch.setattr(DeviceWorker, "_next_batch", held_process.held_next_batch(counted, BATCHES))
    monkeypatch.setattr(Committer, "_commit", commit)
    return taken, first_commit


def _config(tmp_path, model, lengths: list[int]) -> EmbedConfig:
    seqs = random_proteins(lengths, seed=3)
    fasta = write_fasta(tmp_path / "in.fa", [(f"p{i}", s) for i, s in enumerate(seqs)])
    return EmbedConfig(inputs=(fasta,), model=str(model), out=tmp_path / "s.lmdb",
                       max_tokens=96, devices="cpu")


def test_a_held_run_waits_for_its_stop_with_one_batch_in_flight(held, tiny_pt, tmp_path):
    taken, first_commit = held
    config = _config(tmp_path, tiny_pt, [30 + i % 20 for i in range(200)])
    stop, result = threading.Event(), {}

    def target():
        try:
            result["summary"] = run_embed(config, None, stop)
        except BaseException as exc:
            result["error"] = exc

    run = threading.Thread(target=target)
    run.start()
    try:
        while not first_commit.wait(0.05):
            assert run.is_alive(), f"the held run ended before a commit: {result}"
        assert run.is_alive() and len(taken) == BATCHES + 1  # the held one is in flight
    finally:
        stop.set()
        run.join(60)
    summary = result["summary"]
    assert summary.interrupted and len(taken) == BATCHES + 1  # nothing taken after the hold
    assert summary.committed_records == sum(taken) < 200  # the held batch drained, committed


def test_a_run_too_small_to_hold_completes(held, tiny_pt, tmp_path):
    taken, _ = held
    summary = run_embed(_config(tmp_path, tiny_pt, [40] * 6), None)  # two to a batch
    assert not summary.interrupted and summary.committed_records == 6
    assert sum(taken) == 6 and len(taken) <= BATCHES + 1


def test_a_held_run_nobody_stops_fails_after_the_bound(held, tiny_pt, tmp_path, monkeypatch):
    monkeypatch.setattr(held_process, "WAIT_SECONDS", 1.0)
    with pytest.raises(DeviceError, match="got no signal within 1 s"):
        run_embed(_config(tmp_path, tiny_pt, [30 + i % 20 for i in range(200)]), None)


def test_a_held_merge_waits_for_its_stop_after_its_first_chunks(tmp_path, monkeypatch):
    from gpuengine.store.merge import _Merge, merge_stores
    from store_shards import make_spec, records, write_shards

    shards = write_shards(tmp_path / "shards", make_spec(), records(600, seed=2), 2)
    written, stop, result = [], threading.Event(), {}
    real_write_chunk = _Merge._write_chunk

    def counted(self, table, kind, db, chunk, entry):
        real_write_chunk(self, table, kind, db, chunk, entry)
        written.append(kind)

    monkeypatch.setattr(_Merge, "_write_chunk", held_process.held_write_chunk(counted, BATCHES))

    def target():
        result["summary"] = merge_stores(tmp_path / "all.lmdb", shards, stop=stop,
                                         transaction_bytes=2000)

    merge = threading.Thread(target=target)
    merge.start()
    try:
        while written.count("emb") < BATCHES and merge.is_alive():
            stop.wait(0.02)  # (stop is not set here: a pause)
        assert merge.is_alive() and written.count("emb") == BATCHES, (written, result)
    finally:
        stop.set()
        merge.join(60)
    assert result["summary"].interrupted and written.count("emb") == BATCHES
