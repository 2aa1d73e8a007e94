"""The engine's interpreter settings during a run (garbage-collector thresholds and freeze, thread
switch interval) are restored afterwards, also when runs overlap or fail; the switch interval
can be set from the environment."""

from __future__ import annotations

import gc
import sys

import pytest

from gpuengine.config import environment
from gpuengine.engine import PIPELINE_SWITCH_INTERVAL_MS, pipeline_interpreter
from gpuengine.errors import UsageError


def test_settings_are_applied_and_restored():
    before, interval = gc.get_threshold(), sys.getswitchinterval()
    with pipeline_interpreter(12_345, switch_interval_ms=0.3):
        assert gc.get_threshold()[0] == 12_345
        assert gc.get_threshold()[1:] == before[1:]
        assert gc.get_freeze_count() > 0
        assert sys.getswitchinterval() == pytest.approx(0.0003)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    assert sys.getswitchinterval() == interval


def test_overlapping_runs_restore_only_when_the_last_leaves():
    before, interval = gc.get_threshold(), sys.getswitchinterval()
    outer = pipeline_interpreter(20_000)
    outer.__enter__()
    with pipeline_interpreter(30_000, switch_interval_ms=1.0):  # a second run keeps the first's
        assert gc.get_threshold()[0] == 20_000
        assert sys.getswitchinterval() == pytest.approx(PIPELINE_SWITCH_INTERVAL_MS / 1000)
    assert gc.get_threshold()[0] == 20_000  # the first run is still going
    assert sys.getswitchinterval() == pytest.approx(PIPELINE_SWITCH_INTERVAL_MS / 1000)
    outer.__exit__(None, None, None)
    assert gc.get_threshold() == before and sys.getswitchinterval() == interval


def test_restored_after_an_error():
    before, interval = gc.get_threshold(), sys.getswitchinterval()
    with pytest.raises(RuntimeError), pipeline_interpreter():
        raise RuntimeError("boom")
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    assert sys.getswitchinterval() == interval


def test_switch_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv("GPUENGINE_SWITCH_INTERVAL_MS", raising=False)
    assert environment().switch_interval_ms is None
    monkeypatch.setenv("GPUENGINE_SWITCH_INTERVAL_MS", "5")
    assert environment().switch_interval_ms == 5.0
    for bad in ("0", "-1", "fast", "2000"):
        monkeypatch.setenv("GPUENGINE_SWITCH_INTERVAL_MS", bad)
        with pytest.raises(UsageError, match="GPUENGINE_SWITCH_INTERVAL_MS"):
            environment()
