"""Pooling packed hidden states into per-sequence vectors, in fp32, outside the model.

A sequence occupies token rows [s, e) of a packed batch. Which of those rows are its "body" is
data, not a branch: :class:`PoolingRule` says how many rows to skip at each end (ESM-2 skips BOS
and EOS, DNABERT-S keeps CLS and SEP). Modes:

* ``mean``      — mean over the body rows, accumulated in fp32: the rows are gathered into
  zero-padded (sequences × longest body × d) blocks of bounded size and summed along the
  body axis. Deterministic, and, unlike ``torch.segment_reduce`` (which checks its lengths
  with ``.item()``), it never waits for the device: the worker can launch the next batch
  while this one computes;
* ``bos``       — row s (the BOS / CLS row);
* ``per-token`` — the body rows themselves, (sum of body lengths, d), split per sequence later.

Every index is derived on the batch's device from the per-sequence token lengths, with output
sizes known on the host, so building them never waits for the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from gpuengine.vocabulary import POOLS


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

    body_lengths: torch.Tensor
    """int64 (N,): body rows per sequence (≥ 1 for valid input)."""
    first_rows: torch.Tensor
    """int64 (N,): row s of each sequence."""
    lead: int
    """Rows between a sequence's first row and its body."""
    body_total: int
    """Body rows of the whole batch (a host int)."""
    max_body: int
    """Longest body in rows (a host int)."""

    @classmethod
    def build(cls, lengths: torch.Tensor, starts: torch.Tensor, total_tokens: int,
              rule: PoolingRule, max_len: int) -> "PoolingIndex":
        """``lengths``/``starts`` (N,) int64 on the device; ``total_tokens`` their sum and
        ``max_len`` their maximum (host ints)."""
        skipped = rule.lead + rule.trail
        return cls(body_lengths=lengths - skipped, first_rows=starts, lead=rule.lead,
                   body_total=total_tokens - lengths.numel() * skipped,
                   max_body=max(0, max_len - skipped))

    @functools.cached_property
    def body_rows(self) -> torch.Tensor:
        """int64: every body row of every sequence, in order (built only for ``per-token``)."""
        body, total = self.body_lengths, self.body_total
        body_starts = torch.cumsum(body, 0) - body
        within = torch.arange(total, device=body.device) - torch.repeat_interleave(
            body_starts, body, output_size=total)
        return torch.repeat_interleave(self.first_rows + self.lead, body, output_size=total) + within


def pool(hidden: torch.Tensor, index: PoolingIndex, mode: str) -> torch.Tensor:
    """Pool (T, d) hidden states; returns fp32 ((N, d), or (body rows, d) for per-token)."""
    if mode == "bos":
        return hidden.index_select(0, index.first_rows).to(torch.float32)
    if mode == "per-token":
        return hidden.index_select(0, index.body_rows).to(torch.float32)
    if mode == "mean":
        return _mean(hidden, index)
    raise ValueError(f"unknown pooling mode {mode!r}; choose from {', '.join(POOLS)}")


MEAN_BLOCK_ELEMENTS = 1 << 25
"""fp32 elements of one padded block of :func:`_mean` (128 MiB)."""


def _mean(hidden: torch.Tensor, index: PoolingIndex) -> torch.Tensor:
    """fp32 mean over each body: zero-padded blocks of whole sequences, summed along the body
    axis (sizes from host ints only, so no device sync)."""
    n, width = index.body_lengths.numel(), hidden.shape[1]
    longest = max(1, index.max_body)
    per_block = max(1, MEAN_BLOCK_ELEMENTS // (longest * width))
    steps = torch.arange(longest, device=hidden.device)
    means = []
    for first in range(0, n, per_block):
        lengths = index.body_lengths[first:first + per_block]
        valid = steps[None, :] < lengths[:, None]  # (b, longest)
        rows = torch.where(valid, index.first_rows[first:first + per_block, None] + index.lead
                           + steps[None, :], 0)
        block = hidden.index_select(0, rows.reshape(-1)).view(*rows.shape, width).to(torch.float32)
        block.masked_fill_(~valid[..., None], 0.0)  # (a NaN in a padding row stays out)
        means.append(block.sum(dim=1).div_(lengths[:, None]))
    return torch.cat(means) if len(means) > 1 else means[0]
