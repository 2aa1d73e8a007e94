"""``gpuengine.budget.TokenBudget``: a device's token budget learns from out-of-memory errors,
follows the memory telemetry, recovers after successes and never exceeds its maximum; the
largest batch since the telemetry's last look is handed over under the budget's lock."""

from __future__ import annotations

import threading

from gpuengine.budget import MIN_TOKENS, TokenBudget


def test_token_budget_learns_and_recovers():
    b = TokenBudget(memory_tokens=5000, maximum=1000, raise_every=3)
    assert b.tokens() == 1000
    b.after_oom(1000)
    assert b.tokens() == 700
    b.set_memory_tokens(300)  # another process took memory
    assert b.tokens() == 300
    b.set_memory_tokens(10)
    assert b.tokens() == MIN_TOKENS
    b.set_memory_tokens(5000)
    for _ in range(3):
        b.after_success(500)
    assert b.tokens() == int(700 * 1.05) + 1
    for _ in range(300):
        b.after_success(500)
    assert b.tokens() == 1000  # never above the configured maximum
    b.after_oom(10)
    assert b.tokens() == MIN_TOKENS


def test_token_budget_hands_the_largest_batch_to_the_telemetry_once():
    """The worker reports each batch to its budget; the telemetry thread takes the largest
    since its last look (read and reset under the budget's lock: a batch reported meanwhile
    is in this answer or the next, never lost)."""
    b = TokenBudget(memory_tokens=5000, maximum=1000)
    assert b.take_largest_batch() == 0
    for tokens in (100, 300, 200):
        b.after_success(tokens)
    assert b.take_largest_batch() == 300 and b.take_largest_batch() == 0
    b.after_success(50)
    assert b.take_largest_batch() == 50
    taken: list[int] = []
    done = threading.Event()

    def telemetry():
        while not done.is_set():
            taken.append(b.take_largest_batch())

    reader = threading.Thread(target=telemetry)
    reader.start()
    for tokens in range(1, 20_001):  # rising sizes: each answer is above the one before
        b.after_success(tokens)
    done.set()
    reader.join()
    taken = [t for t in taken + [b.take_largest_batch()] if t]
    assert taken[-1] == 20_000 and taken == sorted(set(taken))
