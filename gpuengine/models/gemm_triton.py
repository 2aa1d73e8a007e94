"""The FFN's first GEMM with its activation in the epilogue (Triton, CUDA).

cuBLAS computes ``h = x·Wᵀ + b`` and writes it; a second kernel reads ``h`` back for GELU (ESM-2)
or the GLU gate (DNABERT-S) and writes the result. Here one kernel does both, so the widest
activation of the layer is written once and never read back:

* :func:`linear_gelu` — ``gelu(x·Wᵀ + b)`` (ESM-2's fc1);
* :func:`linear_glu` — ``gelu(x·W_gᵀ) · (x·W_lᵀ)`` where ``W = [W_g; W_l]`` (DNABERT-S's
  ``gated_layers``, no bias): each program computes the matching gate and linear tiles from one
  load of its x tile.

Arithmetic follows the eager layers: products accumulate in fp32; the GEMM output (plus bias)
is rounded to the model dtype as cuBLAS's output is, then GELU (erf) runs in fp32 on that value
and is rounded once; in the GLU the rounded GELU multiplies the rounded linear half in fp32.
Accumulation order differs from cuBLAS's (as between any two GEMM kernels).

Imported only where Triton is installed (it comes with CUDA builds of torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpuengine.models.triton_support import launch_autotuned

_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                          num_stages=s, num_warps=w)
            for m, n, k, s, w in ((128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4),
                                  (128, 128, 64, 4, 8), (64, 256, 64, 4, 4), (128, 256, 32, 4, 8),
                                  (128, 64, 64, 4, 4))]


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering of output tiles (neighbouring programs share rows of x in L2)."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _gelu_erf(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.jit
def _linear_act(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, gate_offset,
                HAS_BIAS: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_tile = x_ptr + rows[:, None] * stride_xm + ks[None, :]
    w_tile = w_ptr + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]  # Wᵀ tile (K, N)
    row_ok = rows[:, None] < M
    col_ok = cols[None, :] < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_l = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = ks < K - k * BLOCK_K
        a = tl.load(x_tile, mask=row_ok & k_ok[None, :], other=0.0)
        b = tl.load(w_tile, mask=col_ok & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
        if GATED:  # the linear half: rows gate_offset… of W, same columns of the output
            b_l = tl.load(w_tile + gate_offset * stride_wn, mask=col_ok & k_ok[:, None], other=0.0)
            acc_l = tl.dot(a, b_l, acc_l)
        x_tile += BLOCK_K
        w_tile += BLOCK_K
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    g = _gelu_erf(acc.to(dtype).to(tl.float32))  # GELU of the rounded GEMM output
    if GATED:
        g = g.to(dtype).to(tl.float32) * acc_l.to(dtype).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], g.to(dtype), mask=row_ok & col_ok)


def _launch(x, w, bias, out, n, gate_offset, gated):
    m, k = x.shape

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    launch_autotuned(_linear_act, grid, x, w, bias if bias is not None else w, out, m, n, k,
                     x.stride(0), w.stride(0), out.stride(0), gate_offset,
                     HAS_BIAS=bias is not None, GATED=gated)


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.stride(1) != 1 or w.stride(1) != 1 or x.dtype != w.dtype:
        raise ValueError("x (T, K) and W (N, K) must be 2-D, of one dtype, with unit column stride")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x has {x.shape[1]} columns, W {w.shape[1]}")


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``gelu(F.linear(x, weight, bias))`` with exact (erf) GELU, in one kernel."""
    _check(x, weight)
    n = weight.shape[0]
    out = x.new_empty(x.shape[0], n)
    _launch(x, weight, bias, out, n, 0, False)
    return out


def linear_glu(x: torch.Tensor, weight: torch.Tensor, inner: int) -> torch.Tensor:
    """``gelu(h[:, :inner]) · h[:, inner:]`` for ``h = F.linear(x, weight)`` (no bias), in one
    kernel; ``weight`` is (2·inner, K)."""
    _check(x, weight)
    if weight.shape[0] != 2 * inner:
        raise ValueError(f"a GLU weight has 2 × {inner} rows, not {weight.shape[0]}")
    out = x.new_empty(x.shape[0], inner)
    _launch(x, weight, None, out, inner, inner, True)
    return out
