"""RoPE applied in place to the q and k columns of a fused qkv projection (Triton, CUDA).

The eager/compiled path (:func:`gpuengine.models.rotary.apply_rotary`) reads q and k out of
the (T, 3·H·D) projection, writes rotated copies and a contiguous copy of v: three extra
tensors per layer. This kernel rotates q and k where they lie and leaves v alone, so the
attention kernel reads q, k and v as strided views of the one projection (row stride 3·H·D).

Arithmetic is the eager path's: load the model dtype, rotate in fp32 with fp32 cos/sin tables
of shape (T, D/2) (``x₁·cos − x₂·sin``, ``x₂·cos + x₁·sin``), cast back once. Only the
contraction of a product and a sum into one fused multiply-add may differ (≤ 1 fp32 ulp before
the cast to fp16/bf16).

Imported only where Triton is installed (it comes with CUDA builds of torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_qk_inplace(qkv, cos, sin, n_rows, row_stride, n_pairs,
                     HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pairs = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)  # (head of q or k, j < D/2)
    head = pairs // HALF
    j = pairs % HALF
    mask = (rows[:, None] < n_rows) & (pairs[None, :] < n_pairs)
    first = qkv + rows[:, None].to(tl.int64) * row_stride + (head * 2 * HALF + j)[None, :]
    a = tl.load(first, mask=mask).to(tl.float32)
    b = tl.load(first + HALF, mask=mask).to(tl.float32)
    table = rows[:, None].to(tl.int64) * HALF + j[None, :]
    c = tl.load(cos + table, mask=mask)
    s = tl.load(sin + table, mask=mask)
    tl.store(first, (a * c - b * s).to(qkv.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (b * c + a * s).to(qkv.dtype.element_ty), mask=mask)


def rotate_qk_inplace(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> None:
    """Rotate the q and k heads of ``qkv`` (T, 3·heads·D), row-major with unit column stride, in
    place; ``cos``/``sin`` are contiguous fp32 (T, D/2)."""
    rows, width = qkv.shape
    half = cos.shape[1]
    if width != 3 * heads * 2 * half or qkv.stride(1) != 1:
        raise ValueError(f"qkv of shape {tuple(qkv.shape)} does not hold 3 × {heads} heads of "
                         f"{2 * half}, or its columns are not contiguous")
    if cos.shape != (rows, half) or sin.shape != (rows, half) or cos.dtype != torch.float32:
        raise ValueError("cos/sin must be fp32 tables of shape (rows, head_dim / 2)")
    n_pairs = 2 * heads * half  # every (head, j) of q and of k
    block_r, block_p = 16, 128
    grid = (triton.cdiv(rows, block_r), triton.cdiv(n_pairs, block_p))
    _rope_qk_inplace[grid](qkv, cos.contiguous(), sin.contiguous(), rows, qkv.stride(0), n_pairs,
                           HALF=half, BLOCK_R=block_r, BLOCK_P=block_p)
