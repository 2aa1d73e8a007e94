"""Row-wise and element-wise kernels of the encoder layers, in Triton (CUDA).

``torch.compile`` with dynamic token counts generates these kernels with flattened, 64-bit
index arithmetic and untuned block sizes; on an H200 its LayerNorm of ESM-2 3B rows ran at
1.1–2 TB/s and DNABERT-S's GELU gate at 1.4 TB/s (profiles in ``docs/benchmarks/``). Here every
kernel walks a 2-D grid (rows × columns) with the row stride as an argument, so no index is
divided, and each is a single pass over memory.

Arithmetic follows the eager layers: inputs in the model dtype are upcast to fp32, LayerNorm
statistics (biased variance, as ``F.layer_norm``) and GELU (erf) are computed in fp32, and each
result is rounded to the model dtype once. :func:`add_layer_norm` rounds the residual sum to
the model dtype *before* normalising it, as eager ``LN(x + y)`` does.

Imported only where Triton is installed (it comes with CUDA builds of torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpuengine.models.triton_support import launch_autotuned


# -- LayerNorm --------------------------------------------------------------------------------------
# Launch shapes are tuned once per row width at the first call (the runner's warm-up batch);
# a row-wise kernel never writes its inputs, so trial runs are harmless.
@triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (2, 4, 8, 16)],
                 key=["n_cols", "HAS_Y", "STORE_RES"])
@triton.jit
def _layer_norm(x_ptr, y_ptr, res_ptr, out_ptr, w_ptr, b_ptr, rbias_ptr, n_cols, stride, eps,
                HAS_Y: tl.constexpr, STORE_RES: tl.constexpr, HAS_RBIAS: tl.constexpr,
                BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0)
    if HAS_Y:  # residual sum, rounded to the model dtype as eager x + y is
        x = (x.to(tl.float32) + tl.load(y_ptr + row * stride + cols, mask=mask, other=0.0)
             .to(tl.float32)).to(x.dtype)
        if STORE_RES:
            if HAS_RBIAS:  # the stored residual carries a bias the next GEMM adds with beta = 1
                r = x.to(tl.float32) + tl.load(rbias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(res_ptr + row * stride + cols, r.to(x.dtype), mask=mask)
            else:
                tl.store(res_ptr + row * stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=0) / n_cols
    centred = tl.where(mask, xf - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride + cols, (centred * rstd * w + b).to(x.dtype), mask=mask)


def _row_block(n_cols: int) -> int:
    return triton.next_power_of_2(n_cols)


def _check_rows(*tensors: torch.Tensor) -> None:
    first = tensors[0]
    for t in tensors:
        if t.dim() != 2 or not t.is_contiguous() or t.shape != first.shape or t.dtype != first.dtype:
            raise ValueError("row kernels take contiguous 2-D tensors of one shape and dtype")


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.layer_norm`` over the last dimension of a contiguous (T, d) tensor."""
    _check_rows(x)
    out = torch.empty_like(x)
    launch_autotuned(_layer_norm, (x.shape[0],), x, x, x, out, weight, bias, weight, x.shape[1],
                     x.stride(0), eps, HAS_Y=False, STORE_RES=False, HAS_RBIAS=False,
                     BLOCK=_row_block(x.shape[1]))
    return out


def residual_layer_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float) -> torch.Tensor:
    """``LN(x + y)``, the sum rounded to the dtype first (a post-LN block's output)."""
    _check_rows(x, y)
    out = torch.empty_like(x)
    launch_autotuned(_layer_norm, (x.shape[0],), x, y, x, out, weight, bias, weight, x.shape[1],
                     x.stride(0), eps, HAS_Y=True, STORE_RES=False, HAS_RBIAS=False,
                     BLOCK=_row_block(x.shape[1]))
    return out


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float, residual_bias: torch.Tensor | None = None):
    """``s = x + y`` (rounded to the dtype) and ``LN(s)``; returns ``(s [+ residual_bias], LN(s))``.

    With ``residual_bias`` the returned residual is ``s + residual_bias`` (rounded), ready for a
    GEMM that adds its product into it in place (``r.addmm_(h, W.t())`` = ``s + h·Wᵀ + b``)."""
    _check_rows(x, y)
    res, out = torch.empty_like(x), torch.empty_like(x)
    rb = residual_bias if residual_bias is not None else weight
    launch_autotuned(_layer_norm, (x.shape[0],), x, y, res, out, weight, bias, rb, x.shape[1],
                     x.stride(0), eps, HAS_Y=True, STORE_RES=True,
                     HAS_RBIAS=residual_bias is not None, BLOCK=_row_block(x.shape[1]))
    return res, out


# -- GELU -------------------------------------------------------------------------------------------
# Tile shapes tuned once per width at the first call; ``restore_value`` puts the output back
# after each trial, so the in-place form is applied exactly once. On an H200 at 65,536 rows
# (tools/bench_kernels.py, e8f4e7a) one or two rows of 1024–2048 columns per program beat the
# taller tiles: the GLU gate 3.77 against 3.57 TB/s, against a 4.0 TB/s device copy.
@triton.autotune(configs=[triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w)
                          for r, c, w in ((1, 1024, 4), (2, 1024, 4), (1, 2048, 4), (2, 2048, 8),
                                          (8, 256, 4), (16, 256, 8), (16, 512, 8), (8, 1024, 8))],
                 key=["n_cols", "GATED"], restore_value=["out_ptr"])
@triton.jit
def _gelu(x_ptr, out_ptr, n_rows, n_cols, x_stride, out_stride, gate_offset,
          GATED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    src = x_ptr + rows[:, None] * x_stride + cols[None, :]
    x = tl.load(src, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    g = 0.5 * xf * (1.0 + tl.math.erf(xf * 0.7071067811865476))
    if GATED:  # GLU: round gelu(first half) to the dtype, multiply by the second half
        g = g.to(x.dtype).to(tl.float32) * tl.load(src + gate_offset, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], g.to(x.dtype), mask=mask)


def _pointwise_grid(rows: int, cols: int):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(cols, meta["BLOCK_C"]))


def gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of a contiguous (T, n) tensor, in place; returns ``x``."""
    _check_rows(x)
    launch_autotuned(_gelu, _pointwise_grid(*x.shape), x, x, x.shape[0], x.shape[1], x.stride(0),
                     x.stride(0), 0, GATED=False)
    return x


def gelu_mul(x: torch.Tensor, inner: int) -> torch.Tensor:
    """``gelu(x[:, :inner]) · x[:, inner:]`` for a contiguous (T, 2·inner) tensor (a GLU)."""
    _check_rows(x)
    if x.shape[1] != 2 * inner:
        raise ValueError(f"a GLU input has 2 × {inner} columns, not {x.shape[1]}")
    out = x.new_empty(x.shape[0], inner)
    launch_autotuned(_gelu, _pointwise_grid(x.shape[0], inner), x, out, x.shape[0], inner,
                     x.stride(0), out.stride(0), inner, GATED=True)
    return out
