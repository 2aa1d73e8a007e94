"""FP8 (e4m3) linear layers for ESM-2: an opt-in, lossy precision (``--precision fp8``).

What runs in FP8 and what does not:

* **Weights** of the chosen GEMMs (:class:`Fp8Config.gemms`, any of qkv, out_proj, fc1, fc2) are
  quantized **once**, when the runner enables FP8 (:func:`enable_fp8`), to e4m3 with one fp32
  scale per output row: ``s = amax(|w_row|) / 448``, ``q = round(w · (448 / amax))``. The fp16
  weight of such a GEMM is then freed; the others stay fp16.
* **Activations** entering an FP8 GEMM are quantized per token (one scale per row, the same
  rule) from the fp32 value of the step that produces them, never re-read from memory: the
  LayerNorm output (→ qkv, → fc1), the GELU output (→ fc2), the attention output (→ out_proj).
  On a GPU the fused Triton kernels of :mod:`.fp8_triton` do this inside the producing kernel;
  :class:`Fp8EagerKernels` does the same arithmetic with torch operations (the CPU path and the
  reference the GPU kernels are tested against).
* The GEMM is ``torch._scaled_mm`` (row-wise scales, fp32 accumulation, bias in the epilogue)
  with an fp16 output where the device's kernel offers one, else bf16 converted to fp16.
* Everything else stays as in fp16: the residual stream in fp16, LayerNorm statistics, RoPE,
  softmax (FlashAttention accumulates in fp32) and GELU in fp32.

FP8 changes embeddings far beyond fp16's rounding (e4m3 keeps 3 mantissa bits; the error
compounds over the layers), so it is never a default: a run measures what it costs on its own
weights and input first (:mod:`gpuengine.fidelity`), and ``gpuengine check`` shows it.
On a GPU it needs compute capability 8.9 or newer (Ada, Hopper and later: FP8 tensor cores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpuengine.errors import DeviceError, UsageError
from gpuengine.models.rotary import apply_rotary, rotary_tables

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
"""Largest finite e4m3 value; a row's largest magnitude maps onto it."""
AMAX_FLOOR = 1e-12
"""A row of zeros gets this amax (its values stay zero, its scale stays finite)."""
GEMMS = ("qkv", "out_proj", "fc1", "fc2")
MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class Fp8Config:
    """Which of a layer's four GEMMs run in FP8 (the others in fp16), and cuBLAS's fast
    accumulation (off: exact fp32 accumulation of the products)."""

    gemms: frozenset[str] = frozenset(GEMMS)
    fast_accum: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "gemms", frozenset(self.gemms))
        unknown = sorted(self.gemms - set(GEMMS))
        if unknown:
            raise UsageError(f"FP8 GEMMs {', '.join(unknown)} are not ESM-2 GEMMs; choose from "
                             f"{', '.join(GEMMS)}")

    @classmethod
    def parse(cls, text: str) -> "Fp8Config":
        """``"qkv,fc1"`` → those two in FP8; ``"all"`` → all four; ``"none"`` → none."""
        text = text.strip()
        if text == "all":
            return cls()
        if text == "none":
            return cls(frozenset())
        return cls(frozenset(part.strip() for part in text.split(",") if part.strip()))

    def describe(self) -> str:
        return ",".join(g for g in GEMMS if g in self.gemms) or "none"


DEFAULT_FP8 = Fp8Config(frozenset(GEMMS) - {"out_proj"})
"""The run default: qkv, fc1 and fc2 in FP8, the attention output projection in fp16. Chosen
from tools/bench_fp8.py on one H200 (ESM-2 3B, commit 7b198c9, docs/benchmarks.md "FP8"): on
150-bp-read proteins all four GEMMs in FP8 ran 131.3 k residues/s (1.49× fp16), min cosine to
fp32 0.99613 on plain and 0.98287 on outlier-stress weights; with out_proj in fp16 128.1 k
(1.45×, 2.4 % slower) at 0.99755 and 0.98959, i.e. about 40 % less error on both. out_proj is
the smallest GEMM (d × d, 1/12 of a layer's GEMM FLOPs) and its FP8 input needs a pass of its
own over the attention output (FlashAttention is torch's), so it buys little speed for much of
the loss. (fc2 in fp16 instead: 119.4 k at 0.99688/0.98977; qkv+fc1 only: 116.3 k, 1.32×, at
0.99822/0.99309.) ``--fp8-gemms`` of ``gpuengine check`` measures any other choice."""


# -- quantization (the arithmetic every path shares) -------------------------------------------

def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and fp32 scales (rows, 1) of a 2-D tensor, one scale per row:
    ``scale = amax / 448`` and ``q = round_to_nearest_even(x · (448 / amax))`` computed in fp32
    (``x · q_scale`` reproduces ``x`` to e4m3's rounding). The fused Triton kernels compute
    exactly this from the same fp32 values."""
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=1, keepdim=True).clamp_min(AMAX_FLOOR)
    # tensor ÷ tensor: torch computes ``scalar / t`` and ``t / scalar`` through a reciprocal,
    # which is not the correctly rounded quotient the kernels compute (div_rn)
    limit = torch.full_like(amax, E4M3_MAX)
    q = (xf * (limit / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, amax / limit


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale


@dataclass
class QuantizedRows:
    """An activation ready for an FP8 GEMM: e4m3 values (T, K) and fp32 scales (T, 1)."""

    values: torch.Tensor
    scales: torch.Tensor


def fp8_linear(x: QuantizedRows, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype, fast_accum: bool,
               result_dtype: torch.dtype) -> torch.Tensor:
    """``x · Wᵀ + b`` from e4m3 operands with row-wise scales (``weight_scale`` (1, N)):
    ``torch._scaled_mm``, fp32 accumulation, written as ``out_dtype`` and returned as
    ``result_dtype`` (the same unless the device's kernel has no fp16 output)."""
    out = torch._scaled_mm(x.values, weight.t(), scale_a=x.scales, scale_b=weight_scale,
                           bias=bias, out_dtype=out_dtype, use_fast_accum=fast_accum)
    return out if out_dtype == result_dtype else out.to(result_dtype)


# -- devices -------------------------------------------------------------------------------------

def fp8_unsupported_reason(device: torch.device) -> str | None:
    """Why ``device`` cannot run FP8 GEMMs at speed, or None when it can (CUDA, compute
    capability ≥ 8.9)."""
    if device.type != "cuda":
        return (f"{device} is not a GPU: FP8 runs on NVIDIA GPUs of compute capability 8.9 or "
                "newer (Ada, Hopper, Blackwell); on the CPU it exists only as the slow reference "
                "that `gpuengine check` uses")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"{device} ({name}) has compute capability {major}.{minor}; FP8 GEMMs need 8.9 "
                "or newer (Ada, Hopper, Blackwell)")
    return None


def require_fp8_device(device: torch.device, *, allow_cpu: bool = False) -> None:
    """Raise a DeviceError that says why, unless ``device`` runs FP8 (or is the CPU and the
    caller accepts the eager reference there)."""
    if allow_cpu and device.type == "cpu":
        return
    reason = fp8_unsupported_reason(device)
    if reason is not None:
        raise DeviceError(f"--precision fp8: {reason}; use --precision fp16 (exact to "
                          "rounding) instead")


def check_fp8_run(family: str, devices) -> None:
    """Before a run reads anything: fp8 is for ESM-2, on devices that run it."""
    if family != "esm2":
        raise UsageError(f"--precision fp8 is implemented for ESM-2 only (this model is "
                         f"{family}); use fp16")
    for device in devices:
        require_fp8_device(device)


def _gemm_out_dtype(device: torch.device) -> torch.dtype:
    """fp16 when the device's row-wise ``_scaled_mm`` writes fp16 (the CPU, and cuBLAS ≥ 12.9
    on Hopper), else bf16 (CUTLASS's row-wise kernel of older builds); a DeviceError when this
    torch runs no row-wise e4m3 GEMM on ``device`` at all."""
    a = torch.zeros(16, 16, device=device).to(E4M3)
    scale_a = torch.ones(16, 1, device=device)
    scale_b = torch.ones(1, 16, device=device)
    failure = None
    for dtype in (torch.float16, torch.bfloat16):
        bias = torch.zeros(16, device=device, dtype=dtype)
        try:
            torch._scaled_mm(a, a.t(), scale_a=scale_a, scale_b=scale_b, bias=bias,
                             out_dtype=dtype)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            failure = exc
            continue
        return dtype
    raise DeviceError(f"--precision fp8: torch {torch.__version__} runs no row-wise scaled e4m3 "
                      f"GEMM on {device} ({str(failure).splitlines()[0][:200]}); use fp16")


# -- the model -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fp8Layout:
    """What every layer of an FP8 model shares (set by :func:`enable_fp8`)."""

    config: Fp8Config
    gemm_out: torch.dtype
    """What ``_scaled_mm`` writes on this device (fp16, else bf16)."""
    dtype: torch.dtype
    """The activation dtype (fp16)."""


def enable_fp8(model: torch.nn.Module, device: torch.device, config: Fp8Config = DEFAULT_FP8,
               *, fused: bool = True, allow_cpu: bool = False) -> str:
    """Quantize the chosen GEMM weights of an ESM-2 model already on ``device`` (once; their
    fp16 weights are freed) and install the FP8 layer kernels: the fused Triton kernels where
    ``fused`` and Triton runs on the device, else the eager ones. Returns the kernel kind."""
    from gpuengine.models.esm2 import Esm2

    if not isinstance(model, Esm2):
        raise UsageError(f"--precision fp8 is implemented for ESM-2 only, not "
                         f"{getattr(model, 'family', type(model).__name__)}; use fp16")
    require_fp8_device(device, allow_cpu=allow_cpu)
    dtype = model.embed_tokens.weight.dtype
    if dtype != torch.float16:
        raise UsageError(f"an FP8 model keeps its activations in fp16; it was built in {dtype}")
    layout = Fp8Layout(config, _gemm_out_dtype(device), dtype)
    with torch.no_grad():
        for layer in model.layers:
            _quantize_layer(layer, layout)
    model.fp8 = layout
    from gpuengine.models.triton_support import triton_available

    kernels = Fp8TritonKernels() if fused and triton_available(device) else Fp8EagerKernels()
    model.kernels = kernels
    return kernels.kind


def shared_fp8(model: torch.nn.Module, config: Fp8Config) -> str:
    """The kernel kind of a model whose weights :func:`enable_fp8` already quantized for
    ``config``: the second and later replicas of a device (``--replicas-per-gpu``) run the first
    one's quantized copy and kernels (the forward only reads them), so nothing is quantized
    twice. A UsageError when the model was quantized for other GEMMs."""
    layout: Fp8Layout = model.fp8
    if layout.config != config:
        raise UsageError(f"this model's weights are quantized to FP8 for "
                         f"{layout.config.describe()}, not {config.describe()}")
    return model.kernels.kind


def _quantize_layer(layer: torch.nn.Module, layout: Fp8Layout) -> None:
    if getattr(layer, "fp8", None) is not None:
        raise UsageError("this model's weights are already quantized to FP8")
    for name in GEMMS:
        if name not in layout.config.gemms:
            continue
        linear = getattr(layer, name)
        q, scale = quantize_rows(linear.weight)
        layer.register_buffer(f"{name}_fp8", q, persistent=False)
        layer.register_buffer(f"{name}_fp8_scale", scale.reshape(1, -1).contiguous(),
                              persistent=False)
        bias = linear.bias.detach().to(layout.gemm_out)
        layer.register_buffer(f"{name}_fp8_bias", bias, persistent=False)
        linear.weight = torch.nn.Parameter(linear.weight.new_empty(0), requires_grad=False)
    layer.fp8 = layout


def layer_linear(layer: torch.nn.Module, name: str, x) -> torch.Tensor:
    """GEMM ``name`` of ``layer`` on ``x``: FP8 when ``x`` is :class:`QuantizedRows` (the GEMM
    is one of the FP8 ones), else the fp16 ``F.linear``."""
    layout: Fp8Layout = layer.fp8
    if isinstance(x, QuantizedRows):
        return fp8_linear(x, getattr(layer, f"{name}_fp8"), getattr(layer, f"{name}_fp8_scale"),
                          getattr(layer, f"{name}_fp8_bias"), layout.gemm_out,
                          layout.config.fast_accum, layout.dtype)
    linear = getattr(layer, name)
    return F.linear(x, linear.weight, linear.bias)


class Fp8EagerKernels:
    """One ESM-2 layer with FP8 GEMMs in torch operations (the CPU path, and the reference the
    Triton kernels are tested against), step for step as :class:`Fp8TritonKernels`: each FP8
    GEMM's input is quantized from the fp32 value its producer computed; an fp16 fc2 adds into
    the residual plus its bias (``addmm``). With no GEMM in FP8 it is the fp16 layer up to that
    order of the last addition and the fp32 rounding of LayerNorm and GELU."""

    kind = "fp8-eager"
    whole_layer = True
    rope_tables = staticmethod(rotary_tables)

    def layer(self, layer, x: torch.Tensor, rope, layout, attention) -> torch.Tensor:
        gemms = layer.fp8.config.gemms
        total, d = x.shape
        h = F.layer_norm(x.float(), (d,), layer.attn_norm.weight.float(),
                         layer.attn_norm.bias.float(), layer.eps)
        qkv = layer_linear(layer, "qkv", _producer(h, "qkv" in gemms, x.dtype))
        q, k, v = qkv.view(total, 3, layer.heads, -1).unbind(1)
        if attention.prescale_q:
            q = q * layer.scaling
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        attn = attention(q, k, v.contiguous(), layout).reshape(total, d)
        x = x + layer_linear(layer, "out_proj",
                             _quantize(attn) if "out_proj" in gemms else attn)
        h = F.layer_norm(x.float(), (d,), layer.ffn_norm.weight.float(),
                         layer.ffn_norm.bias.float(), layer.eps)
        f = layer_linear(layer, "fc1", _producer(h, "fc1" in gemms, x.dtype))
        g = gelu_erf(f.float())
        if "fc2" in gemms:
            return x + layer_linear(layer, "fc2", _quantize(g))
        # an fp16 fc2 adds into the residual that already holds its bias, as the Triton path
        residual = (x.float() + layer.fc2.bias.float()).to(x.dtype)
        return torch.addmm(residual, g.to(x.dtype), layer.fc2.weight.t())


def gelu_erf(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU written out as the Triton kernels compute it."""
    return 0.5 * x * (1.0 + torch.erf(x * 0.7071067811865476))


def _quantize(x: torch.Tensor) -> QuantizedRows:
    return QuantizedRows(*quantize_rows(x))


def _producer(value_fp32: torch.Tensor, fp8: bool, dtype: torch.dtype):
    """The fp32 output of a producing step as the next GEMM takes it: quantized per token for
    an FP8 GEMM, rounded to the activation dtype for an fp16 one."""
    return _quantize(value_fp32) if fp8 else value_fp32.to(dtype)


class Fp8TritonKernels:
    """One ESM-2 layer with FP8 GEMMs and the fused Triton kernels (CUDA): LayerNorm (and the
    residual add before it) quantizing its output per token, GELU quantizing its output, the
    attention output quantized in one pass, RoPE in place on the qkv projection. The fp16 GEMMs
    of a mixed choice run as in the ``triton`` kernels (fc2 adding into the residual)."""

    kind = "fp8-triton"
    whole_layer = True

    def __init__(self):
        from gpuengine.models import fp8_triton, pointwise_triton
        from gpuengine.models.rotary import rotary_half_tables
        from gpuengine.models.rotary_triton import rotate_qk_inplace

        self.fq, self.pt, self._rotate = fp8_triton, pointwise_triton, rotate_qk_inplace
        self.rope_tables = rotary_half_tables

    def layer(self, layer, x: torch.Tensor, rope, layout, attention) -> torch.Tensor:
        if attention.prescale_q:
            raise ValueError("the FP8 Triton kernels serve attention kernels that scale q "
                             "themselves")
        gemms, fq, pt = layer.fp8.config.gemms, self.fq, self.pt
        total, d = x.shape
        norm = layer.attn_norm
        h = (QuantizedRows(*fq.layer_norm_quant(x, norm.weight, norm.bias, layer.eps))
             if "qkv" in gemms else pt.layer_norm(x, norm.weight, norm.bias, layer.eps))
        qkv = layer_linear(layer, "qkv", h)
        rows = getattr(attention, "rows", None)  # a flex binding's row bucket
        if rows is not None and rows != total:
            padded = qkv.new_zeros(rows, qkv.shape[1])
            padded[:total] = qkv
            qkv = padded
        self._rotate(qkv[:total], *rope, layer.heads)
        q, k, v = qkv.view(qkv.shape[0], 3, layer.heads, -1).unbind(1)
        attn = attention(q, k, v, layout).reshape(total, d)
        y = layer_linear(layer, "out_proj", QuantizedRows(*fq.quantize_rows(attn))
                         if "out_proj" in gemms else attn)
        norm = layer.ffn_norm
        bias = None if "fc2" in gemms else layer.fc2.bias  # fc2 in fp16 adds into the residual
        if "fc1" in gemms:
            residual, hq, hs = fq.add_layer_norm_quant(x, y, norm.weight, norm.bias, layer.eps,
                                                       residual_bias=bias)
            h = QuantizedRows(hq, hs)
        else:
            residual, h = pt.add_layer_norm(x, y, norm.weight, norm.bias, layer.eps,
                                            residual_bias=bias)
        f = layer_linear(layer, "fc1", h)
        if "fc2" in gemms:
            return residual.add_(layer_linear(layer, "fc2", QuantizedRows(*fq.gelu_quant(f))))
        return residual.addmm_(pt.gelu_(f), layer.fc2.weight.t())
