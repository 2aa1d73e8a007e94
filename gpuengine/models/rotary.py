"""Rotary position embedding (GPT-NeoX half-split style), computed in fp32.

ESM-2 rotates the full head dimension with ``inv_freq`` taken from the checkpoint (the stored
values were rounded to fp16 during training; recomputing them in fp32 drifts from the
reference). Angles, cos and sin are built in fp32 from per-row positions, so in a packed batch
each sequence's positions restart at 0; q and k are rotated in fp32 and cast back, never through
fp16 tables (fp16 holds integers exactly only up to 2048).
"""

from __future__ import annotations

import torch


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (T, 1, head_dim), fp32, for rows at ``positions`` (T,)."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]  # (T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (T, 1, D)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` in fp32 for x of shape (T, H, D); returns x's dtype."""
    xf = x.to(torch.float32)
    first, second = xf.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return ((xf * cos) + (rotated * sin)).to(x.dtype)


def rotary_half_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (T, head_dim / 2), fp32: the distinct half of :func:`rotary_tables`
    (its two halves are equal), for the in-place kernel of :mod:`.rotary_triton`."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    return freqs.cos(), freqs.sin()

