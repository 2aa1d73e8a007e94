"""Block-diagonal (packed) self-attention with one signature and two implementations.

A packed batch is N sequences concatenated into T rows; ``cu_seqlens`` (int32, N + 1 entries,
starting at 0) marks where each one starts. Attention must never cross a boundary.

* :class:`VarlenAttention` — ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 inside
  PyTorch, torch ≥ 2.10), CUDA and fp16/bf16 only. Called with the seven positional arguments that
  both the 2.10 and the 2.11+ signatures share; the kernel applies the default 1/√head_dim scale
  itself, so callers hand it an unscaled q (``prescale_q = False``).
* :class:`PaddedAttention` — the exact path for CPU and fp32: scatter the packed rows into a
  zero-padded ``(N, H, L, D)`` block, run ``scaled_dot_product_attention`` with a key mask and
  ``scale=1`` on a q the caller has already scaled (``prescale_q = True``, fair-esm's order), and
  gather the rows back. Padding never reaches a real row: keys beyond a sequence are masked and
  padded query rows are dropped.

Both take q, k, v of shape ``(T, H, D)`` and return ``(T, H, D)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F


@cache
def _varlen_attn():
    """``varlen_attn``, or None on a torch without it (< 2.10). Imported on first use: the
    module imports torch._dynamo (about 1.5 s of CPU), which a CPU or fp32 run never needs."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # pragma: no cover - depends on the installed torch
        return None
    return varlen_attn


class HeadShape:
    """For model configs with ``embed_dim`` and ``attention_heads``: the check that the heads
    divide the width, and the head width."""

    embed_dim: int
    attention_heads: int

    def __post_init__(self) -> None:
        if self.embed_dim % self.attention_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of "
                             f"attention_heads {self.attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads


@dataclass(frozen=True)
class PackedLayout:
    """Where each sequence of a packed batch lives, on the batch's device.

    Built once per batch and shared by every layer.
    """

    cu_seqlens: torch.Tensor
    """int32 (N + 1,), starts at 0, contiguous."""
    max_len: int
    """Longest sequence in tokens, a Python int (reading it from a device tensor would sync)."""
    positions: torch.Tensor
    """int64 (T,): position of each row within its own sequence (restarts at 0)."""
    pad_index: torch.Tensor | None = None
    """int64 (T,): row → flat index into an (N · max_len) padded block (exact path only)."""
    key_mask: torch.Tensor | None = None
    """bool (N, 1, 1, max_len): True where a key is a real token (exact path only)."""

    starts: torch.Tensor | None = None
    """int64 (N,): first row of each sequence."""

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @classmethod
    def build(cls, lengths: torch.Tensor, total: int, max_len: int, *, padded: bool) -> "PackedLayout":
        """A layout from per-sequence token counts already on the batch's device (int64);
        ``total`` and ``max_len`` come from the host, so nothing here waits for the device."""
        device = lengths.device
        n = lengths.numel()
        cu = torch.zeros(n + 1, dtype=torch.int64, device=device)
        torch.cumsum(lengths, 0, out=cu[1:])
        starts = cu[:-1]
        positions = torch.arange(total, device=device) - torch.repeat_interleave(
            starts, lengths, output_size=total)
        pad_index = key_mask = None
        if padded:
            seq_of_row = torch.repeat_interleave(torch.arange(n, device=device), lengths,
                                                 output_size=total)
            pad_index = seq_of_row * max_len + positions
            key_mask = (torch.arange(max_len, device=device)[None, :] < lengths[:, None])[:, None, None, :]
        return cls(cu.to(torch.int32), max_len, positions, pad_index, key_mask, starts)


class PaddedAttention:
    """Exact attention for any device and dtype (see module docstring)."""

    prescale_q = True
    needs_padding = True

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 layout: PackedLayout) -> torch.Tensor:
        total, heads, dim = q.shape
        n, length = layout.num_sequences, layout.max_len

        def to_padded(x: torch.Tensor) -> torch.Tensor:
            block = x.new_zeros(n * length, heads, dim)
            block[layout.pad_index] = x
            return block.view(n, length, heads, dim).transpose(1, 2)  # (N, H, L, D)

        out = F.scaled_dot_product_attention(
            to_padded(q), to_padded(k), to_padded(v), attn_mask=layout.key_mask, scale=1.0
        )  # (N, H, L, D)
        return out.transpose(1, 2).reshape(n * length, heads, dim)[layout.pad_index]


class VarlenAttention:
    """FlashAttention-2 varlen kernel (CUDA, fp16/bf16)."""

    prescale_q = False
    needs_padding = False

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 layout: PackedLayout) -> torch.Tensor:
        cu, m = layout.cu_seqlens, layout.max_len
        return _varlen_attn()(q, k, v, cu, cu, m, m)


def select_attention(device: torch.device, dtype: torch.dtype) -> PaddedAttention | VarlenAttention:
    """The fastest implementation that is exact enough for this device and dtype."""
    if (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and _varlen_attn() is not None):
        return VarlenAttention()
    return PaddedAttention()


def varlen_available() -> bool:
    return _varlen_attn() is not None
