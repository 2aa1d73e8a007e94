"""Pooling packed hidden states into per-sequence vectors, in fp32, outside the model.

A sequence occupies token rows [s, e) of a packed batch. Which of those rows are its "body" is
data, not a branch: :class:`PoolingRule` says how many rows to skip at each end (ESM-2 skips BOS
and EOS, DNABERT-S keeps CLS and SEP). Modes:

* ``mean``      — mean over the body rows, accumulated in fp32 (``segment_reduce``, deterministic);
* ``bos``       — row s (the BOS / CLS row);
* ``per-token`` — the body rows themselves, (sum of body lengths, d), split per sequence later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

POOL_MODES = ("mean", "bos", "per-token")


@dataclass(frozen=True)
class PoolingRule:
    """Rows of each sequence's span excluded from ``mean`` and ``per-token``."""

    lead: int
    """Rows skipped at the start (ESM-2: 1 for BOS; DNABERT-S: 0, CLS is included)."""
    trail: int
    """Rows skipped at the end (ESM-2: 1 for EOS; DNABERT-S: 0, SEP is included)."""


@dataclass(frozen=True)
class PoolingIndex:
    """Host-side row indices of one batch, computed once and moved with the batch."""

    body_rows: np.ndarray
    """int64: every body row of every sequence, in order."""
    body_lengths: np.ndarray
    """int64 (N,): body rows per sequence (≥ 1 for valid input)."""
    first_rows: np.ndarray
    """int64 (N,): row s of each sequence."""

    @classmethod
    def build(cls, token_lengths: np.ndarray, rule: PoolingRule) -> "PoolingIndex":
        lengths = np.asarray(token_lengths, dtype=np.int64)
        starts = np.zeros(lengths.size, dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        body = lengths - rule.lead - rule.trail
        if body.size and body.min() < 1:
            raise ValueError("a sequence has no body rows to pool")
        body_starts = np.repeat(starts + rule.lead, body)
        offsets = np.arange(body.sum()) - np.repeat(np.cumsum(body) - body, body)
        return cls(body_rows=body_starts + offsets, body_lengths=body, first_rows=starts)


def pool(hidden: torch.Tensor, index: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    """Pool (T, d) hidden states with an index moved to hidden's device as tensors
    (``body_rows``, ``body_lengths``, ``first_rows``). Returns fp32."""
    if mode == "bos":
        return hidden.index_select(0, index["first_rows"]).to(torch.float32)
    body = hidden.index_select(0, index["body_rows"]).to(torch.float32)
    if mode == "per-token":
        return body
    if mode == "mean":
        return torch.segment_reduce(body, "mean", lengths=index["body_lengths"], axis=0)
    raise ValueError(f"unknown pooling mode {mode!r}; choose from {', '.join(POOL_MODES)}")
