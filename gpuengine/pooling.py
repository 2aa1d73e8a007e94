"""Pooling packed hidden states into per-sequence vectors, in fp32, outside the model.

A sequence occupies token rows [s, e) of a packed batch. Which of those rows are its "body" is
data, not a branch: :class:`PoolingRule` says how many rows to skip at each end (ESM-2 skips BOS
and EOS, DNABERT-S keeps CLS and SEP). Modes:

* ``mean``      — mean over the body rows, accumulated in fp32 (``segment_reduce``, deterministic);
* ``bos``       — row s (the BOS / CLS row);
* ``per-token`` — the body rows themselves, (sum of body lengths, d), split per sequence later.

Every index is derived on the batch's device from the per-sequence token lengths, with output
sizes known on the host, so building them never waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """Device-side row indices of one batch."""

    body_rows: torch.Tensor
    """int64: every body row of every sequence, in order."""
    body_lengths: torch.Tensor
    """int64 (N,): body rows per sequence (≥ 1 for valid input)."""
    first_rows: torch.Tensor
    """int64 (N,): row s of each sequence."""

    @classmethod
    def build(cls, lengths: torch.Tensor, starts: torch.Tensor, total_tokens: int,
              rule: PoolingRule) -> "PoolingIndex":
        """``lengths``/``starts`` (N,) int64 on the device; ``total_tokens`` their sum (host)."""
        n = lengths.numel()
        body = lengths - (rule.lead + rule.trail)
        body_total = total_tokens - n * (rule.lead + rule.trail)
        body_starts = torch.cumsum(body, 0) - body
        within = torch.arange(body_total, device=lengths.device) - torch.repeat_interleave(
            body_starts, body, output_size=body_total)
        rows = torch.repeat_interleave(starts + rule.lead, body, output_size=body_total) + within
        return cls(body_rows=rows, body_lengths=body, first_rows=starts)


def pool(hidden: torch.Tensor, index: PoolingIndex, mode: str) -> torch.Tensor:
    """Pool (T, d) hidden states; returns fp32 ((N, d), or (body rows, d) for per-token)."""
    if mode == "bos":
        return hidden.index_select(0, index.first_rows).to(torch.float32)
    body = hidden.index_select(0, index.body_rows).to(torch.float32)
    if mode == "per-token":
        return body
    if mode == "mean":
        return torch.segment_reduce(body, "mean", lengths=index.body_lengths, axis=0)
    raise ValueError(f"unknown pooling mode {mode!r}; choose from {', '.join(POOL_MODES)}")
