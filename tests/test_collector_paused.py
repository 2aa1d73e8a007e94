"""A run pauses Python's cyclic collector (threshold 0: no collection by allocation count,
which kept rescanning the scheduler's window of live work items) and its loop runs a full
collection every ``COLLECT_SECONDS`` instead, so cyclic garbage made during a long run is
still freed during it."""

from __future__ import annotations

import gc
import time
import weakref

from conftest import random_proteins, write_fasta
from digest_runner import DigestRunner
from gpuengine import engine
from gpuengine.engine import collect_if_due, relaxed_collector


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def _cycle_ref() -> weakref.ref:
    return weakref.ref(_Cycle())  # unreachable at once, freed only by a collection


def test_collect_if_due_collects_only_when_paused_and_due():
    with relaxed_collector(0):
        assert gc.get_threshold()[0] == 0
        ref = _cycle_ref()
        now = time.monotonic()
        assert collect_if_due(now, now) == now and ref() is not None  # not due yet
        last = now - engine.COLLECT_SECONDS - 1
        assert collect_if_due(last, now) == now and ref() is None  # due: collected
    gc.collect()
    ref = _cycle_ref()  # the collector runs by count again: not this function's to collect
    last = time.monotonic() - engine.COLLECT_SECONDS - 1
    assert collect_if_due(last, time.monotonic()) == last and ref() is not None
    gc.collect()


class _CyclicRunner(DigestRunner):
    """Leaves a garbage cycle per batch and notes, per batch, how many earlier ones were
    already freed (only a collection can free them)."""

    def __init__(self, outputs, computed, refs, freed_during):
        super().__init__(outputs, computed, pace=0.01)
        self.refs, self.freed_during = refs, freed_during

    def finish(self, items):
        self.freed_during.append(sum(r() is None for r in self.refs))
        self.refs.append(_cycle_ref())
        return super().finish(items)


def test_a_run_frees_cyclic_garbage_while_it_runs(tiny_pt, tmp_path, monkeypatch):
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed

    monkeypatch.setattr(engine, "COLLECT_SECONDS", 0.05)
    fasta = write_fasta(tmp_path / "in.fa", [(f"p{i}", s) for i, s in
                                             enumerate(random_proteins([20] * 120, seed=3))])
    refs: list = []
    freed_during: list[int] = []
    before = gc.get_threshold()
    summary = run_embed(EmbedConfig(inputs=(fasta,), model=str(tiny_pt), out=tmp_path / "s.lmdb",
                                    max_tokens=100),
                        runner_factory=lambda d, p, o: _CyclicRunner(o, [], refs, freed_during))
    assert summary.embedded == 120 and len(refs) > 10
    assert max(freed_during) > 0  # collected while the run held the collector paused
    assert gc.get_threshold() == before
