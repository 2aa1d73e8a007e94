"""Per-device token budgets: how many tokens the next batch on a device may hold.

The budget is the smaller of

* the *memory* budget: usable free memory over bytes per token (see :func:`memory_budget`), and
* the *learned* cap: lowered to 70 % of a batch that ran out of memory, raised by 5 % after
  every 50 successful batches (never above the configured maximum).

Worked example (ESM-2 650M, fp16, d = 1280): bytes per token ≈ 2 · 24 · 1280 + 8 · 1280
≈ 71.7 kB; with 60 GiB free and a 2 GiB margin that is (58 · 2³⁰) / 71 680 ≈ 868 k tokens, so the
configured maximum (default 65 536) decides.
"""

from __future__ import annotations

import threading

DEFAULT_GPU_MAX_TOKENS = 65_536
DEFAULT_CPU_MAX_TOKENS = 4_096
MIN_TOKENS = 64


def activation_bytes_per_token(embed_dim: int, itemsize: int, n_outputs: int) -> int:
    """Conservative peak activation bytes per token of one pre-LN transformer layer (about 12·d
    live values, doubled for allocator slack) plus fp32 pooling copies of each output."""
    return itemsize * 24 * embed_dim + 4 * embed_dim * (1 + n_outputs)


def memory_budget(free_bytes: int, bytes_per_token: int, margin_bytes: int) -> int:
    return max(0, (free_bytes - margin_bytes) // max(1, bytes_per_token))


class TokenBudget:
    """Thread-safe budget for one device."""

    def __init__(self, memory_tokens: int, maximum: int, *, raise_every: int = 50):
        self._lock = threading.Lock()
        self._memory = max(MIN_TOKENS, memory_tokens)
        self._maximum = max(MIN_TOKENS, maximum)
        self._learned = self._maximum
        self._successes = 0
        self._raise_every = raise_every
        self._largest = 0

    def tokens(self) -> int:
        with self._lock:
            return max(MIN_TOKENS, min(self._memory, self._learned, self._maximum))

    def set_memory_tokens(self, tokens: int) -> None:
        with self._lock:
            self._memory = max(MIN_TOKENS, tokens)

    def after_oom(self, batch_tokens: int) -> None:
        with self._lock:
            self._learned = max(MIN_TOKENS, min(self._learned, int(batch_tokens * 0.7)))
            self._successes = 0

    def after_success(self, batch_tokens: int) -> None:
        """A batch of ``batch_tokens`` ran (the device worker's thread): every 50th success
        raises the learned cap; the batch counts for :meth:`take_largest_batch`."""
        with self._lock:
            self._largest = max(self._largest, batch_tokens)
            self._successes += 1
            if self._successes >= self._raise_every and self._learned < self._maximum:
                self._learned = min(self._maximum, int(self._learned * 1.05) + 1)
                self._successes = 0

    def launched(self, batch_tokens: int) -> None:
        """A batch of ``batch_tokens`` was launched (the device worker's thread): its memory is
        allocated now, so it counts for :meth:`take_largest_batch` from now on, not only once
        it finishes (the allocator's peak already holds it)."""
        with self._lock:
            self._largest = max(self._largest, batch_tokens)

    def take_largest_batch(self) -> int:
        """The largest batch launched or finished since the last call (0: none), and forget
        it: the telemetry thread sets the memory limit from it and the allocator's peak."""
        with self._lock:
            largest, self._largest = self._largest, 0
            return largest

    def describe(self) -> dict[str, int]:
        with self._lock:
            return {"memory_tokens": self._memory, "learned_cap": self._learned,
                    "maximum": self._maximum}
