"""``gpuengine.planner``: what it decides before anything is embedded (resume and dedupe
through the store's digests). The planner inside whole runs is tested in test_engine.py
(deduplication, reruns, exactly once) and test_inputs.py."""

from __future__ import annotations

import os

from gpuengine.planner import DigestFilter


def test_digest_filter_has_no_false_negatives():
    added = [os.urandom(16) for _ in range(5000)]
    others = [os.urandom(16) for _ in range(5000)]
    f = DigestFilter(len(added))
    assert not any(f.maybe_many(added))
    f.add_many(added[:2500])
    f.add_many(added[2500:])
    assert all(f.maybe_many(added))
    assert sum(f.maybe_many(others)) < 0.05 * len(others)
