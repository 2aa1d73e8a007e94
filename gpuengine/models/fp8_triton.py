"""Per-token FP8 quantization fused into the kernels that produce each FP8 GEMM's input (Triton,
CUDA).

Quantizing an activation in separate kernels (read the fp16 tensor for its row maxima, read it
again to scale and convert) threw most of FP8's speed away on an H200 (issue 17: 1.1–1.2× instead
of 1.6–1.75× over bf16 GEMMs). Here the producing kernel quantizes what it computes before it is
ever written in fp16:

* :func:`layer_norm_quant` — LayerNorm → e4m3 (the qkv input);
* :func:`add_layer_norm_quant` — residual add, its fp16 store (optionally plus the next GEMM's
  bias), LayerNorm → e4m3 (the fc1 input);
* :func:`gelu_quant` — erf GELU of the fc1 output → e4m3 (the fc2 input);
* :func:`quantize_rows` — a tensor's rows → e4m3 (the attention output, the out_proj input).

Arithmetic is :func:`gpuengine.models.fp8.quantize_rows`'s on the same fp32 values: per row
``amax = max(|v|, 1e-12)``, ``q = round_rtne(clamp(v · (448 / amax)))``, scale ``amax / 448``,
both divisions correctly rounded (``div_rn``). LayerNorm statistics follow
:mod:`.pointwise_triton` (fp32, biased variance, the residual sum rounded to the dtype first).
Only the LayerNorm's and GELU's own fp32 rounding may differ from torch's, which can move a
value across an e4m3 rounding boundary (one e4m3 step, rarely).

Imported only where Triton is installed (it comes with CUDA builds of torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpuengine.models.triton_support import launch_autotuned

E4M3_MAX = tl.constexpr(448.0)  # a kernel reads module globals only when they are constexpr
AMAX_FLOOR = tl.constexpr(1e-12)


@triton.jit
def _quantize_store(v, q_ptrs, s_ptr, mask, amax):
    """Quantize the row ``v`` whose largest magnitude is the scalar ``amax``; store the e4m3
    values and the row's scale. Both divisions correctly rounded (``div_rn``: Triton's ``/``
    on fp32 is the approximate ``div.full``)."""
    limit = tl.full([], E4M3_MAX, tl.float32)
    amax = tl.maximum(amax, AMAX_FLOOR)
    q = tl.minimum(tl.maximum(v * tl.math.div_rn(limit, amax), -E4M3_MAX), E4M3_MAX)
    tl.store(q_ptrs, q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr, tl.math.div_rn(amax, limit))


# -- LayerNorm (after an optional residual add) → e4m3 ---------------------------------------------
@triton.autotune(configs=[triton.Config({}, num_warps=w) for w in (4, 8, 16)],
                 key=["n_cols", "HAS_Y", "HAS_RBIAS"])
@triton.jit
def _layer_norm_quant(x_ptr, y_ptr, res_ptr, q_ptr, s_ptr, w_ptr, b_ptr, rbias_ptr, n_cols,
                      stride, q_stride, eps, HAS_Y: tl.constexpr, HAS_RBIAS: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0)
    if HAS_Y:  # residual sum, rounded to the model dtype as eager x + y is, and stored
        x = (x.to(tl.float32) + tl.load(y_ptr + row * stride + cols, mask=mask, other=0.0)
             .to(tl.float32)).to(x.dtype)
        r = x
        if HAS_RBIAS:  # the stored residual carries the bias an fp16 fc2 adds with beta = 1
            r = (x.to(tl.float32) + tl.load(rbias_ptr + cols, mask=mask, other=0.0)
                 .to(tl.float32)).to(x.dtype)
        tl.store(res_ptr + row * stride + cols, r, mask=mask)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=0) / n_cols
    centred = tl.where(mask, xf - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    h = tl.where(mask, centred * rstd * w + b, 0.0)
    _quantize_store(h, q_ptr + row * q_stride + cols, s_ptr + row, mask,
                    tl.max(tl.abs(h), axis=0))


# -- rows (optionally through GELU) → e4m3, in column chunks ---------------------------------------
# The width is a compile-time constant (one compilation per model width: static loop bounds).
@triton.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=w)
                          for b, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16))],
                 key=["n_cols", "GELU"])
@triton.jit
def _rows_quant(x_ptr, q_ptr, s_ptr, x_stride, q_stride, n_cols: tl.constexpr,
                GELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    q_row = q_ptr + row * q_stride
    peak = tl.zeros([BLOCK], dtype=tl.float32)
    for chunk in range(0, tl.cdiv(n_cols, BLOCK)):  # pass 1: the row's largest magnitude
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        if GELU:
            v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
        peak = tl.maximum(peak, tl.abs(v))
    limit = tl.full([], E4M3_MAX, tl.float32)
    amax = tl.maximum(tl.max(peak, axis=0), AMAX_FLOOR)
    mult = tl.math.div_rn(limit, amax)
    for chunk in range(0, tl.cdiv(n_cols, BLOCK)):  # pass 2 (the row is in L1/L2): scale, convert
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        v = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
        q = tl.minimum(tl.maximum(v * mult, -E4M3_MAX), E4M3_MAX)
        tl.store(q_row + cols, q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + row, tl.math.div_rn(amax, limit))


def _check(x: torch.Tensor, *others: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("FP8 quantization kernels take 2-D tensors with contiguous rows")
    for other in others:
        if other.shape != x.shape or other.stride() != x.stride() or other.dtype != x.dtype:
            raise ValueError("the residual and the added tensor must have one shape, layout "
                             "and dtype")


def _outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    return (torch.empty(rows, cols, device=x.device, dtype=torch.float8_e4m3fn),
            torch.empty(rows, 1, device=x.device, dtype=torch.float32))


def layer_norm_quant(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """``quantize_rows(F.layer_norm(x.float(), …))`` of a (T, d) tensor: e4m3 (T, d) and fp32
    scales (T, 1); the LayerNorm's fp16 output is never written."""
    _check(x)
    q, s = _outputs(x)
    launch_autotuned(_layer_norm_quant, (x.shape[0],), x, x, x, q, s, weight, bias, weight,
                     x.shape[1], x.stride(0), q.stride(0), eps, HAS_Y=False, HAS_RBIAS=False,
                     BLOCK=triton.next_power_of_2(x.shape[1]))
    return q, s


def add_layer_norm_quant(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor, eps: float, residual_bias: torch.Tensor | None = None):
    """``s = x + y`` (rounded to the dtype) and the quantized ``LN(s)``; returns
    ``(s [+ residual_bias], q, scales)`` (see :func:`.pointwise_triton.add_layer_norm`)."""
    _check(x, y)
    res = torch.empty_like(x)
    q, s = _outputs(x)
    rb = residual_bias if residual_bias is not None else weight
    launch_autotuned(_layer_norm_quant, (x.shape[0],), x, y, res, q, s, weight, bias, rb,
                     x.shape[1], x.stride(0), q.stride(0), eps, HAS_Y=True,
                     HAS_RBIAS=residual_bias is not None, BLOCK=triton.next_power_of_2(x.shape[1]))
    return res, q, s


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of a (T, n) tensor (:func:`gpuengine.models.fp8.quantize_rows`)."""
    _check(x)
    q, s = _outputs(x)
    launch_autotuned(_rows_quant, (x.shape[0],), x, q, s, x.stride(0), q.stride(0),
                     n_cols=x.shape[1], GELU=False)
    return q, s


def gelu_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization of the erf GELU of a (T, n) tensor, computed in fp32 from
    ``x``; the GELU's fp16 output is never written."""
    _check(x)
    q, s = _outputs(x)
    launch_autotuned(_rows_quant, (x.shape[0],), x, q, s, x.stride(0), q.stride(0),
                     n_cols=x.shape[1], GELU=True)
    return q, s
