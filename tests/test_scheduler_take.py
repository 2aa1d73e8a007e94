"""The ready queue's batch cut (running sums in C, a binary search) takes the same items as
cutting one item at a time with :func:`gpuengine.packing.batch_cost`, for packed and padded
devices."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_item
from gpuengine.packing import batch_cost
from gpuengine.scheduler import _Ready


def _one_at_a_time(sizes: list[int], budget: int, padded: bool) -> int:
    taken, total, longest = 1, sizes[0], sizes[0]
    for tokens in sizes[1:]:
        if batch_cost(taken + 1, total + tokens, max(longest, tokens), padded) > budget:
            break
        taken, total, longest = taken + 1, total + tokens, max(longest, tokens)
    return taken


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("budget", [1, 40, 700, 5000, 200_000])
def test_take_cuts_where_batch_cost_says(padded, budget):
    rng = np.random.default_rng(budget)
    sizes = rng.integers(3, 300, 6000).tolist()
    items = [make_item(f"i{i}", n) for i, n in enumerate(sizes)]
    ready = _Ready()
    ready.extend(items[:5000])
    at, end = 0, 5000
    while ready:
        if end == 5000 and at > 4500:  # more arrive (the consumed front is dropped then)
            ready.extend(items[5000:])
            end = 6000
        batch = ready.take(budget, padded)
        assert tuple(batch) == tuple(items[at:at + len(batch)])
        assert len(batch) == _one_at_a_time(sizes[at:end], budget, padded)
        at += len(batch)
        assert len(ready) == end - at
    assert at == 6000 or (budget >= 200_000 and at == end)
