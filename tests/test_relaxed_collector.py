"""The engine's garbage-collector settings during a run are restored afterwards, also when runs
overlap or fail."""

from __future__ import annotations

import gc

import pytest

from gpuengine.engine import relaxed_collector


def test_thresholds_and_freeze_are_restored():
    before = gc.get_threshold()
    with relaxed_collector(12_345):
        assert gc.get_threshold()[0] == 12_345
        assert gc.get_threshold()[1:] == before[1:]
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_overlapping_runs_restore_only_when_the_last_leaves():
    before = gc.get_threshold()
    outer = relaxed_collector(20_000)
    outer.__enter__()
    with relaxed_collector(30_000):  # a second run started meanwhile keeps the first's setting
        assert gc.get_threshold()[0] == 20_000
    assert gc.get_threshold()[0] == 20_000  # the first run is still going
    outer.__exit__(None, None, None)
    assert gc.get_threshold() == before


def test_restored_after_an_error():
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), relaxed_collector():
        raise RuntimeError("boom")
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
