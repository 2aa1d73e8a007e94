"""The scheduler's intake window: a stable sort by token count, whether the token counts come
with the items as an array (the planner's) or are read from them."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_item
from gpuengine.scheduler import Scheduler


def _drain(scheduler: Scheduler, budget: int) -> list:
    out = []
    while (batch := scheduler.next_batch(0, budget)) is not None:
        out.extend(batch.items)
        scheduler.complete(batch.batch_id)
    return out


@pytest.mark.parametrize("window", [7, 1000])
def test_the_window_is_a_stable_sort_by_token_count(window):
    rng = np.random.default_rng(window)
    sizes = rng.integers(3, 9, 300)  # many ties: the stable order shows
    items = [make_item(f"i{i}", int(n)) for i, n in enumerate(sizes)]
    # all submitted before any is taken: no bound on the queue (test_scheduler_room's)
    given, read = (Scheduler(window=window, max_queued=1 << 40),
                   Scheduler(window=window, max_queued=1 << 40))
    for at in range(0, len(items), 25):
        given.submit(items[at:at + 25], sizes[at:at + 25])
        read.submit(items[at:at + 25])
    given.close()
    read.close()
    flushed = 25 if window <= 25 else len(items)  # each submission fills the window, or none
    expected = []
    for at in range(0, len(items), flushed):
        expected += sorted(items[at:at + flushed], key=lambda item: item.n_tokens)  # stable
    assert _drain(given, 40) == _drain(read, 40) == expected


def test_token_counts_must_match_the_items():
    with pytest.raises(ValueError, match="3 items with 2 token counts"):
        Scheduler().submit([make_item(f"i{i}", 5) for i in range(3)], np.array([5, 5]))
