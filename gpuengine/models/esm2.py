"""ESM-2 as a packed (padding-free) encoder, exact to fair-esm's ``ESM2.forward``.

Per layer (pre-LN, LayerNorm eps 1e-5)::

    h = attn_norm(x)
    q, k, v = split(qkv(h))            # one fused (3d, d) projection of the separate q/k/v weights
    q = q · head_dim^-0.5              # before RoPE, as fair-esm (kernels that scale do it instead)
    q, k = rope(q), rope(k)            # fp32, checkpoint inv_freq, positions restart per sequence
    x = x + out_proj(attention(q, k, v))   # block-diagonal; softmax accumulates in fp32
    x = x + fc2(gelu_erf(fc1(ffn_norm(x))))

The embedding is multiplied by 0.88 (token-dropout rescale; input never holds ``<mask>``). The
final LayerNorm applies only to the last layer's representation; an intermediate layer is the
raw residual stream. The LM and contact heads are not built. Layers past the deepest requested
representation are not run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpuengine.models.attention import (
    HeadShape,
    PackedLayout,
    PaddedAttention,
    VarlenAttention,
)
from gpuengine.models.rotary import apply_rotary, rotary_half_tables, rotary_tables
from gpuengine.models.triton_support import triton_available

TOKEN_DROPOUT_SCALE = 1 - 0.15 * 0.8
"""fair-esm's ``(1 - mask_ratio_train) / (1 - 0)`` for inputs without ``<mask>``: 0.88."""


@dataclass(frozen=True)
class Esm2Config(HeadShape):
    num_layers: int
    embed_dim: int
    attention_heads: int
    vocab_size: int = 33
    layer_norm_eps: float = 1e-5


def attention_inputs(x: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor,
                     qkv_w: torch.Tensor, qkv_b: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     heads: int, q_scale: float, eps: float, rows: int | None = None):
    """Pre-LN, fused q/k/v projection, q scaling (1.0 when the kernel scales), RoPE. Returns
    T rows whatever ``rows`` asks (an attention with a row bucket pads them itself)."""
    total = x.shape[0]
    h = F.layer_norm(x, (x.shape[-1],), norm_w, norm_b, eps)
    qkv = F.linear(h, qkv_w, qkv_b).view(total, 3, heads, -1)  # (T, 3, H, D)
    q, k, v = qkv.unbind(1)
    if q_scale != 1.0:
        q = q * q_scale
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.contiguous()


def attention_output_and_ffn(x: torch.Tensor, attn: torch.Tensor, out_w: torch.Tensor,
                             out_b: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor,
                             fc1_w: torch.Tensor, fc1_b: torch.Tensor, fc2_w: torch.Tensor,
                             fc2_b: torch.Tensor, eps: float) -> torch.Tensor:
    """Residual after out_proj, then the pre-LN FFN with erf GELU and its residual."""
    x = x + F.linear(attn.reshape(x.shape[0], -1), out_w, out_b)
    h = F.layer_norm(x, (x.shape[-1],), norm_w, norm_b, eps)
    return x + F.linear(F.gelu(F.linear(h, fc1_w, fc1_b)), fc2_w, fc2_b)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


class LayerKernels:
    """The per-layer functions (``eager``). :func:`layer_kernels` gives the other kinds:

    * ``compiled`` — ``torch.compile``d versions (one compilation shared by every layer, dynamic
      in the token count): LayerNorm, q/k/v split, RoPE and the residual/GELU steps fused.
    * ``fused-rope`` (CUDA with Triton, kernels that scale q themselves) — compiled LayerNorm and
      FFN, and RoPE applied in place to the q and k columns of the qkv projection by
      :mod:`.rotary_triton`; q, k and v reach the attention as strided views, never copied.
    * ``triton`` — ``fused-rope`` with Triton LayerNorm / residual / GELU kernels
      (:class:`TritonKernels`).
    """

    kind = "eager"
    rope_tables = staticmethod(rotary_tables)
    attention_inputs = staticmethod(attention_inputs)
    attention_output_and_ffn = staticmethod(attention_output_and_ffn)


class FusedRopeKernels(LayerKernels):
    kind = "fused-rope"
    rope_tables = staticmethod(rotary_half_tables)

    def __init__(self):
        from gpuengine.models.rotary_triton import rotate_qk_inplace

        self._rotate = rotate_qk_inplace
        self._layer_norm = torch.compile(layer_norm, dynamic=True)
        self.attention_output_and_ffn = torch.compile(attention_output_and_ffn, dynamic=True)

    def attention_inputs(self, x, norm_w, norm_b, qkv_w, qkv_b, cos, sin, heads, q_scale, eps,
                         rows=None):
        """q, k, v as strided views of one projection; with ``rows`` > T (an attention's row
        bucket) the projection is written into a buffer of that many rows, zero beyond T, so
        the attention needs no padded copies."""
        if q_scale != 1.0:
            raise ValueError("fused-rope kernels serve attention kernels that scale q themselves")
        total = x.shape[0]
        h = self._layer_norm(x, norm_w, norm_b, eps)
        if rows is None or rows == total:
            qkv = F.linear(h, qkv_w, qkv_b)  # (T, 3d)
        else:
            qkv = h.new_empty(rows, qkv_w.shape[0])
            qkv[total:].zero_()
            torch.addmm(qkv_b, h, qkv_w.t(), out=qkv[:total])
        self._rotate(qkv[:total], cos, sin, heads)
        return qkv.view(qkv.shape[0], 3, heads, -1).unbind(1)  # strided (rows, H, D) views


class TritonKernels(FusedRopeKernels):
    """``fused-rope`` plus Triton LayerNorm, residual + LayerNorm and in-place GELU
    (:mod:`.pointwise_triton`); the FFN's residual is added by the fc2 GEMM itself
    (``beta = 1`` into the residual, which already holds fc2's bias)."""

    kind = "triton"

    def __init__(self):
        from gpuengine.models import pointwise_triton as pt
        from gpuengine.models.rotary_triton import rotate_qk_inplace

        self._rotate = rotate_qk_inplace
        self._layer_norm = pt.layer_norm
        self._add_layer_norm = pt.add_layer_norm
        self._gelu_ = pt.gelu_

    def attention_output_and_ffn(self, x, attn, out_w, out_b, norm_w, norm_b, fc1_w, fc1_b,
                                 fc2_w, fc2_b, eps):
        y = F.linear(attn.reshape(x.shape[0], -1), out_w, out_b)
        residual, h = self._add_layer_norm(x, y, norm_w, norm_b, eps, residual_bias=fc2_b)
        return residual.addmm_(self._fc1_gelu(h, fc1_w, fc1_b), fc2_w.t())

    def _fc1_gelu(self, h, fc1_w, fc1_b):
        return self._gelu_(F.linear(h, fc1_w, fc1_b))


class FusedFc1Kernels(TritonKernels):
    """``triton`` with fc1 and GELU in one kernel (:func:`.gemm_triton.linear_gelu`): the
    (T, 4d) pre-activation is never written."""

    kind = "triton-fused-fc1"

    def __init__(self):
        super().__init__()
        from gpuengine.models.gemm_triton import linear_gelu

        self._fc1_gelu = linear_gelu


KERNEL_KINDS = ("eager", "compiled", "fused-rope", "triton", "triton-fused-fc1")


def layer_kernels(kind: str) -> LayerKernels:
    """Per-layer kernels of ``kind`` (see :class:`LayerKernels`)."""
    if kind == "eager":
        return LayerKernels()
    if kind == "compiled":
        kernels = LayerKernels()
        kernels.kind = "compiled"
        kernels.attention_inputs = torch.compile(attention_inputs, dynamic=True)
        kernels.attention_output_and_ffn = torch.compile(attention_output_and_ffn, dynamic=True)
        return kernels
    if kind == "fused-rope":
        return FusedRopeKernels()
    if kind == "triton":
        return TritonKernels()
    if kind == "triton-fused-fc1":
        return FusedFc1Kernels()
    raise ValueError(f"unknown kernel kind {kind!r}; choose one of {', '.join(KERNEL_KINDS)}")


def fastest_kernels(device: torch.device, attention) -> str:
    """The kind the runner uses when compiling: the Triton kernels where they can run, else
    compiled."""
    if not attention.prescale_q and triton_available(device):
        return "triton"
    return "compiled"


class Esm2Layer(nn.Module):
    def __init__(self, cfg: Esm2Config):
        super().__init__()
        d = cfg.embed_dim
        self.heads, self.head_dim = cfg.attention_heads, cfg.head_dim
        self.scaling = self.head_dim ** -0.5
        self.eps = cfg.layer_norm_eps
        self.attn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.register_buffer("inv_freq", torch.zeros(self.head_dim // 2, dtype=torch.float32))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                layout: PackedLayout, attention: PaddedAttention | VarlenAttention,
                kernels: LayerKernels) -> torch.Tensor:
        if getattr(kernels, "whole_layer", False):  # FP8 kernels (models/fp8.py) run the layer
            return kernels.layer(self, x, rope, layout, attention)
        q_scale = self.scaling if attention.prescale_q else 1.0
        rows = getattr(attention, "rows", None)  # a flex binding's row bucket
        q, k, v = kernels.attention_inputs(x, self.attn_norm.weight, self.attn_norm.bias,
                                           self.qkv.weight, self.qkv.bias, *rope, self.heads,
                                           q_scale, self.eps, rows=rows)
        attn = attention(q, k, v, layout)  # (T, H, D)
        return kernels.attention_output_and_ffn(
            x, attn, self.out_proj.weight, self.out_proj.bias, self.ffn_norm.weight,
            self.ffn_norm.bias, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
            self.eps)


class Esm2(nn.Module):
    """Packed ESM-2 encoder. Load weights with :func:`gpuengine.models.esm2_weights.load_esm2`."""

    family = "esm2"

    def __init__(self, cfg: Esm2Config):
        super().__init__()
        self.cfg = cfg
        # No random init (_weight): the loaders build on the meta device and assign the weights;
        # normal_ on a meta tensor would import torch._dynamo, ~1.5 s of CPU at every start.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim,
                                         _weight=torch.empty(cfg.vocab_size, cfg.embed_dim))
        self.layers = nn.ModuleList(Esm2Layer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    kernels = LayerKernels()
    fp8 = None
    """Set by :func:`gpuengine.models.fp8.enable_fp8` (then the FP8 kernels are installed)."""

    def set_kernels(self, kind: str) -> None:
        if self.fp8 is not None:
            raise ValueError("this model's GEMMs run in FP8: its kernels were chosen by enable_fp8")
        self.kernels = layer_kernels(kind)

    def fastest_kernels(self, device: torch.device, attention) -> str:
        return fastest_kernels(device, attention)

    def forward(self, token_ids: torch.Tensor, layout: PackedLayout, layers: Sequence[int],
                attention: PaddedAttention | VarlenAttention) -> dict[int, torch.Tensor]:
        """Representations (T, d) of the requested non-negative ``layers`` (0 = embeddings)."""
        wanted = set(layers)
        x = self.embed_tokens(token_ids) * TOKEN_DROPOUT_SCALE  # (T, d)
        if hasattr(attention, "bind"):  # masks built once per batch for every layer
            attention = attention.bind(layout, self.cfg.attention_heads, x.dtype)
        reps = {0: x} if 0 in wanted else {}
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for index, layer in enumerate(self.layers[: max(wanted)]):
            key = id(layer.inv_freq) if not self._shared_rope else 0
            if key not in tables:
                tables[key] = self.kernels.rope_tables(layout.positions, layer.inv_freq)
            x = layer(x, tables[key], layout, attention, self.kernels)
            if index + 1 in wanted:
                reps[index + 1] = self.final_norm(x) if index + 1 == self.num_layers else x
        return reps

    _shared_rope = False

    def share_rope_tables_if_equal(self) -> None:
        """Compute cos/sin once per batch when every layer stores the same inv_freq (the usual
        case); otherwise each layer keeps its own."""
        first = self.layers[0].inv_freq
        self._shared_rope = all(torch.equal(first, layer.inv_freq) for layer in self.layers)
