"""FlexAttention over a packed batch: a block-sparse document mask built from ``cu_seqlens``.

The packed rows are one sequence of B = 1, padded to a row bucket (:func:`flex_bucket`); each
query block visits only the key blocks its own sequences touch (:func:`document_block_mask`),
and an element mask keeps every row inside its sequence. Scores are computed in fp32 by the
compiled kernel; an optional ``score_mod`` adds a bias (DNABERT-S's ALiBi,
:class:`gpuengine.models.dnabert_s.FlexAlibiAttention`).

Short sequences are where this beats FlashAttention-2's varlen kernel, which spends one
128-row tile and one thread block per sequence and head: see :class:`FlexDocumentAttention`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpuengine.models.attention import PackedLayout

FLEX_BLOCK = 64
"""FlexAttention's sparse block size (and kernel tile): packed rows are padded to a multiple of
it. On one H200 (DNABERT-S shape, fp16, 65k-token batches, 32d0187) 64-row blocks gave 1.84 M
tokens/s on 150-bp reads and 1.82 M on 500-bp chunks against 1.75 M for flex's default 128:
reads of 34–110 tokens waste most of a 128 × 128 tile."""


def flex_bucket(total: int, block: int = FLEX_BLOCK) -> int:
    """Rows the packed batch is padded to: ``block`` × the next power of two blocks, so a compiled
    kernel sees at most one length per octave (11 up to 65,536 rows; each new one compiles for
    a few seconds). Padding rows cost memory only (q, k and v are projected into the padded
    buffer, zero beyond the real rows): their query blocks get no key blocks."""
    blocks = max(1, -(-total // block))
    return (1 << (blocks - 1).bit_length()) * block


def document_block_mask(cu_seqlens: torch.Tensor, total: int, padded: int, mask_mod,
                        block: int = FLEX_BLOCK):
    """A ``BlockMask`` for a packed batch of ``total`` rows padded to ``padded``, built on the
    device from ``cu_seqlens`` without a dense mask. Query block i visits the contiguous key
    blocks from the first row of its first sequence to the last row of its last sequence; all
    are partial (``mask_mod`` decides per element). Blocks of padding rows visit nothing."""
    from torch.nn.attention.flex_attention import BlockMask

    device = cu_seqlens.device
    cu = cu_seqlens.to(torch.int64)
    nblocks = padded // block
    first = torch.arange(nblocks, device=device) * block  # first row of each query block
    real = first < total
    first = first.clamp(max=total - 1)
    last = (first + block - 1).clamp(max=total - 1)
    ends = cu[1:].contiguous()
    first_doc = torch.searchsorted(ends, first, right=True)
    last_doc = torch.searchsorted(ends, last, right=True)
    lo = cu[first_doc] // block
    hi = (cu[last_doc + 1] - 1) // block
    count = torch.where(real, hi - lo + 1, torch.zeros_like(lo))
    indices = (lo[:, None] + torch.arange(nblocks, device=device)[None, :]).clamp(max=nblocks - 1)
    extra = {"compute_q_blocks": False} if _FROM_KV_HAS_Q_FLAG else {}
    return BlockMask.from_kv_blocks(count.to(torch.int32)[None, None],
                                    indices.to(torch.int32)[None, None],
                                    BLOCK_SIZE=block, mask_mod=mask_mod, **extra)


def _from_kv_has_q_flag() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:  # pragma: no cover - torch < 2.5
        return False
    return "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters


_FROM_KV_HAS_Q_FLAG = _from_kv_has_q_flag()


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - torch < 2.5
        return False
    return True


class FlexDocumentAttention:
    """Block-diagonal attention on the packed rows with FlexAttention (no bias).

    ``compiled=True`` runs ``torch.compile(flex_attention)`` (needs Triton on CUDA); uncompiled
    flex materialises the full (H, T, T) scores and serves CPU tests of the masks only.
    :meth:`bind` builds the masks of one batch once for all layers.

    ``dynamic=True`` (the default) compiles once for every row bucket: the row count is a
    symbol of the kernel, not a constant, and the rows are padded to at least two blocks (a
    dimension of size 1 would be specialised and compile again). The kernel is told the rows
    divide into its tiles (``IS_DIVISIBLE``: every bucket is a multiple of ``block``, the
    tiles' size), which inductor proves by itself only for static shapes; without it the
    kernel masks every load, and dynamic flex measured 21 % slower (1.38 M against 1.75 M
    tokens/s, 32d0187). ``dynamic=False`` compiles once per row bucket (:func:`flex_bucket`:
    up to 11, a few seconds each, on the critical path of a cold run). ``backend`` is
    ``torch.compile``'s (tests count compilations on the CPU with ``aot_eager``).
    """

    alibi = False
    prescale_q = False  # flex scales by 1/√D itself (before any score_mod)
    needs_padding = False

    def __init__(self, *, compiled: bool = True, dynamic: bool = True, block: int = FLEX_BLOCK,
                 backend: str = "inductor"):
        from torch.nn.attention.flex_attention import flex_attention

        self.compiled = compiled
        self.dynamic = dynamic
        self.block = block
        flex = flex_attention
        if compiled:
            flex = torch.compile(flex_attention, dynamic=dynamic, backend=backend)
            options = {"IS_DIVISIBLE": True}  # rows: a multiple of `block`, which the tiles divide
            if block != 128:  # flex's own tiles are 128; they must divide the mask's blocks
                options.update(BLOCK_M=block, BLOCK_N=block)
            if backend == "inductor":
                flex = functools.partial(flex, kernel_options=options)
        self._flex = flex

    def padded_rows(self, total: int) -> int:
        """The rows a batch of ``total`` packed rows is padded to."""
        padded = flex_bucket(total, self.block)
        return max(padded, 2 * self.block) if self.compiled and self.dynamic else padded

    def score_mod(self, heads: int, device: torch.device):
        """A bias on the scores (``None``: plain softmax attention)."""
        return None

    def bind(self, layout: PackedLayout, heads: int, dtype: torch.dtype) -> BoundFlex:
        device = layout.positions.device
        total = layout.positions.numel()
        padded = self.padded_rows(total)
        cu = layout.cu_seqlens.to(torch.int64)
        doc = torch.full((padded,), -1, dtype=torch.int32, device=device)  # padding rows: -1
        doc[:total] = torch.repeat_interleave(
            torch.arange(layout.num_sequences, dtype=torch.int32, device=device), cu[1:] - cu[:-1],
            output_size=total)

        def same_sequence(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx]

        block_mask = document_block_mask(layout.cu_seqlens, total, padded, same_sequence,
                                         self.block)
        if self.compiled and self.dynamic:  # dynamo keeps a BlockMask's sizes static otherwise
            from torch._dynamo import maybe_mark_dynamic

            maybe_mark_dynamic(block_mask.kv_num_blocks, 2)
            maybe_mark_dynamic(block_mask.kv_indices, 2)
            maybe_mark_dynamic(block_mask.kv_indices, 3)
        return BoundFlex(self._flex, self.score_mod(heads, device), block_mask, padded, total)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 layout: PackedLayout) -> torch.Tensor:
        return self.bind(layout, q.shape[1], q.dtype)(q, k, v, layout)


@dataclass
class BoundFlex:
    flex: object
    score_mod: object
    block_mask: object
    rows: int
    """The row bucket: q, k and v may come with these rows (zero beyond ``total``), then they
    are not copied into a padded buffer."""
    total: int
    prescale_q = False

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 layout: PackedLayout | None = None) -> torch.Tensor:
        total = self.total

        def to_flex(x: torch.Tensor) -> torch.Tensor:  # (T or T_pad, H, D) → (1, H, T_pad, D)
            if x.shape[0] != self.rows:
                x = F.pad(x, (0, 0, 0, 0, 0, self.rows - x.shape[0]))
            return x.transpose(0, 1).unsqueeze(0)

        out = self.flex(to_flex(q), to_flex(k), to_flex(v), score_mod=self.score_mod,
                        block_mask=self.block_mask)  # (1, H, T_pad, D)
        return out[0, :, :total].transpose(0, 1)  # (T, H, D)


class LengthSwitchedAttention:
    """FlexAttention (:class:`FlexDocumentAttention`) for batches whose longest sequence is at
    most ``flex_max_len`` tokens, ``long`` (FlashAttention-2 varlen) for the others. Both are
    exact block-diagonal attention; the choice is made per batch in :meth:`bind`."""

    alibi = False
    prescale_q = False
    needs_padding = False

    def __init__(self, long, flex: FlexDocumentAttention, flex_max_len: int):
        if long.prescale_q or long.needs_padding:
            raise ValueError("the long-batch attention must take unscaled q on packed rows")
        self.long, self.flex, self.flex_max_len = long, flex, flex_max_len

    def bind(self, layout: PackedLayout, heads: int, dtype: torch.dtype):
        if layout.max_len <= self.flex_max_len:
            return self.flex.bind(layout, heads, dtype)
        return self.long

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 layout: PackedLayout) -> torch.Tensor:
        return self.bind(layout, q.shape[1], q.dtype)(q, k, v, layout)

