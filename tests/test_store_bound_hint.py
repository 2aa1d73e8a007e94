"""The closing summary says when the store's writers, not the devices, set a run's pace, and
what to try (``RunSummary.store_bound``, ``display.store_bound_hint``)."""

from __future__ import annotations

import io

from rich.console import Console

from gpuengine.display import print_summary, store_bound_hint
from gpuengine.run_summary import RunSummary


def _summary(embed=20.0, commit=18.0, writers=1, busy=(0.5,), shard=""):
    s = RunSummary("out.lmdb", "t", "m", False, embed_seconds=embed, commit_seconds=commit,
                   writers=writers, shard=shard)
    s.devices = [{"device": f"cuda:{i}", "sequences": 1, "tokens": 1, "tokens_per_second": 1.0,
                  "busy_fraction": b} for i, b in enumerate(busy)]
    return s


def _printed(summary) -> str:
    buf = io.StringIO()
    print_summary(summary, Console(file=buf, width=300, color_system=None))
    return buf.getvalue()


def test_a_writer_committing_while_the_devices_wait_is_named_with_what_to_try():
    s = _summary()
    assert s.store_bound == (0.9, 0.5)
    text = _printed(s)
    assert "the store's writer committed 90% of the embedding time while the devices were busy 50%" in text
    assert "--writers 2" in text
    assert s.to_json()["store_bound"] == {"writer_committing": 0.9, "devices_busy": 0.5}


def test_several_writers_count_their_commit_time_each():
    """Two writers committing 36 s of a 20 s run: 90 % each; 30 s would be 75 %: no note."""
    s = _summary(commit=36.0, writers=2, busy=(0.6, 0.4))
    assert s.store_bound == (0.9, 0.5)
    assert "each of the 2 store writers" in store_bound_hint(s) and "--writers 4" in store_bound_hint(s)
    assert _summary(commit=30.0, writers=2).store_bound is None


def test_no_note_when_the_devices_were_busy_or_the_run_was_short():
    for s in (_summary(busy=(0.99,)), _summary(busy=(0.9, 0.95)), _summary(embed=5.0, commit=4.9),
              _summary(commit=10.0)):
        assert s.store_bound is None and store_bound_hint(s) is None
        assert "note:" not in _printed(s)
        assert s.to_json()["store_bound"] is None


def test_a_shard_run_is_not_told_to_use_parts():
    hint = store_bound_hint(_summary(shard="1/4"))
    assert "--shard run writes one store" in hint and "--writers" not in hint
