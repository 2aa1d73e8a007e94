"""DNABERT-S (MosaicBERT / DNABERT-2 architecture) as a packed (padding-free) encoder.

Exact to the authors' ``bert_layers.py`` (``BertModel(...)[0]``), read line by line:

    x = LN(word[ids] + token_type[0])                        # no position embeddings, eps 1e-12
    per layer (post-LN, 12×):
        q, k, v = split(Wqkv(x), (3, heads, head_dim))       # fused, with bias
        s = q·kᵀ / √head_dim − slope_h · |i − j|             # ALiBi after the scaling, symmetric
        x = LN(dense(softmax(s)·v) + x)
        g, u = split(gated_layers(x), 2)                     # no bias; GELU (erf) on the FIRST half
        x = LN(wo(gelu(g) · u) + x)
    no final LayerNorm; the pooler (tanh(dense(h[CLS]))) is not built.

Layer 0 is the embeddings module's output (after its LayerNorm); layer N is the last layer.

ALiBi depends only on |i − j| inside one sequence, so in a packed batch the global row distance
of two rows of the same sequence is their within-sequence distance; rows of different
sequences are masked. The slopes follow Press et al. (the 2^k heads first, then every other
slope of the 2^(k+1) set), computed here for any head count; the table is never in the state
dict.

Attention (one call signature with :mod:`gpuengine.models.attention`; ``alibi = True``):

* :class:`AlibiPaddedAttention` — exact, any device and dtype: scatter the packed rows into
  (N, H, L, D), SDPA with a float bias (ALiBi, −inf on padded keys), gather back. Every SDPA
  backend that accepts a float bias (CPU flash/math, CUDA memory-efficient/cuDNN, math with
  half inputs) accumulates the softmax in fp32. The bias costs N·H·L² elements of the dtype.
* :class:`FlexAlibiAttention` — FlexAttention on the packed rows: B = 1, rows padded to a
  bucket of 64-row blocks, a document mask from ``cu_seqlens`` built directly as a block-sparse
  ``BlockMask`` (no dense Q×KV mask), ALiBi as a ``score_mod`` (fp32 scores). Compiled on CUDA.

:func:`select_alibi_attention` picks one (flex on CUDA in half precision, padded otherwise). :meth:`DnabertS.forward` accepts any gpuengine
attention object: one without ALiBi (the ESM-2 classes the runner selects by default) is
replaced by :meth:`DnabertS.select_attention` for the batch's device and dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpuengine.models.attention import HeadShape, PackedLayout
from gpuengine.models.flex import FlexDocumentAttention, flex_available
from gpuengine.models.triton_support import triton_available

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DnabertSConfig(HeadShape):
    num_layers: int = 12
    embed_dim: int = 768
    attention_heads: int = 12
    intermediate_size: int = 3072
    """Width of one GLU half; ``gated_layers`` projects to twice this."""
    vocab_size: int = 4096
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


# -- ALiBi -----------------------------------------------------------------------------------------
def alibi_slopes(heads: int) -> list[float]:
    """Press et al.'s slopes, as MosaicBERT computes them (float64; the model uses them in fp32).

    For 2^k heads: start = 2^(−8/2^k), slope_i = start · start^i. Otherwise the 2^⌊log2 h⌋
    slopes first, then every other slope of the 2^(⌊log2 h⌋+1)-head set. 12 heads: 2^-1 … 2^-8,
    then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    """
    if heads < 1:
        raise ValueError(f"heads must be positive, got {heads}")

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        return power_of_2(heads)
    closest = 2 ** math.floor(math.log2(heads))
    return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: heads - closest]


_SLOPES: dict[tuple[int, str], torch.Tensor] = {}


def alibi_slope_tensor(heads: int, device: torch.device) -> torch.Tensor:
    """fp32 (H,) slopes on ``device``, cached."""
    key = (heads, str(device))
    if key not in _SLOPES:
        _SLOPES[key] = torch.tensor(alibi_slopes(heads), dtype=torch.float32, device=device)
    return _SLOPES[key]


def padding_indices(layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``pad_index`` and ``key_mask`` as ``PackedLayout.build(padded=True)`` makes them, for a
    layout built without them (no host sync: sizes come from host ints and tensor shapes)."""
    if layout.pad_index is not None and layout.key_mask is not None:
        return layout.pad_index, layout.key_mask
    cu = layout.cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    n, total, length = layout.num_sequences, layout.positions.numel(), layout.max_len
    device = cu.device
    seq_of_row = torch.repeat_interleave(torch.arange(n, device=device), lengths, output_size=total)
    pad_index = seq_of_row * length + layout.positions
    key_mask = (torch.arange(length, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    return pad_index, key_mask


# -- attention: exact padded path ------------------------------------------------------------------
class AlibiPaddedAttention:
    """Exact ALiBi attention for any device and dtype (see module docstring)."""

    alibi = True
    prescale_q = False  # SDPA applies 1/√D, then adds the bias: DNABERT's order
    needs_padding = True

    def bind(self, layout: PackedLayout, heads: int, dtype: torch.dtype) -> _BoundPadded:
        """Build the batch's (N, H, L, L) bias once; every layer reuses it."""
        pad_index, key_mask = padding_indices(layout)
        device, length = layout.positions.device, layout.max_len
        steps = torch.arange(length, device=device)
        distance = (steps[None, :] - steps[:, None]).abs()  # (L, L)
        alibi = (alibi_slope_tensor(heads, device)[:, None, None] * -distance).to(dtype)  # (H, L, L)
        blocked = torch.tensor(float("-inf"), dtype=dtype, device=device)
        bias = torch.where(key_mask, alibi[None], blocked)  # (N, H, L, L)
        return _BoundPadded(pad_index, bias, layout.num_sequences, length)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 layout: PackedLayout) -> torch.Tensor:
        return self.bind(layout, q.shape[1], q.dtype)(q, k, v, layout)


@dataclass
class _BoundPadded:
    pad_index: torch.Tensor
    bias: torch.Tensor
    n: int
    length: int
    prescale_q = False

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 layout: PackedLayout | None = None) -> torch.Tensor:
        _, heads, dim = q.shape

        def to_padded(x: torch.Tensor) -> torch.Tensor:
            block = x.new_zeros(self.n * self.length, heads, dim)
            block[self.pad_index] = x
            return block.view(self.n, self.length, heads, dim).transpose(1, 2)  # (N, H, L, D)

        out = F.scaled_dot_product_attention(to_padded(q), to_padded(k), to_padded(v),
                                             attn_mask=self.bias)  # (N, H, L, D)
        return out.transpose(1, 2).reshape(self.n * self.length, heads, dim)[self.pad_index]


# -- attention: FlexAttention -----------------------------------------------------------------------
class FlexAlibiAttention(FlexDocumentAttention):
    """FlexAttention with ALiBi on the packed rows (see module docstring): the document mask of
    :class:`FlexDocumentAttention` and ``score − slope_h · |i − j|`` as its ``score_mod``
    (flex scales by 1/√D before, DNABERT's order)."""

    alibi = True

    def score_mod(self, heads: int, device: torch.device):
        slopes = alibi_slope_tensor(heads, device)

        def alibi(score, b, h, q_idx, kv_idx):
            return score - slopes[h] * torch.abs(q_idx - kv_idx)

        return alibi


def select_alibi_attention(device: torch.device, dtype: torch.dtype, kind: str = "auto"):
    """``padded`` (exact, any device/dtype), ``flex`` (compiled on CUDA, eager elsewhere) or
    ``auto``: compiled flex on CUDA in fp16/bf16, the padded path otherwise (CPU, fp32).

    Measured on one H200 (torch 2.11, real DNABERT-S shape, random weights, fp16, 65k-token
    batches): ~115-token sequences 1.25 M tok/s flex vs 0.99 M padded (cuDNN SDPA); 74 sequences
    up to 1801 tokens 1.06 M vs 0.45 M, peak 2.1 vs 7.5 GiB; flex vs padded cosine ≥ 0.999999.
    The first call compiles (about 4 s, dynamic shapes: once for every row bucket, see
    :class:`~gpuengine.models.flex.FlexDocumentAttention`).
    """
    device = torch.device(device)
    if kind == "auto":
        half = dtype in (torch.float16, torch.bfloat16)
        kind = "flex" if device.type == "cuda" and half and flex_available() else "padded"
    if kind == "padded":
        return AlibiPaddedAttention()
    if kind == "flex":
        if not flex_available():
            raise RuntimeError("FlexAttention needs torch >= 2.5 (torch.nn.attention.flex_attention)")
        return FlexAlibiAttention(compiled=device.type == "cuda")
    raise ValueError(f"unknown ALiBi attention kind {kind!r}; choose auto, flex or padded")


# -- the model ---------------------------------------------------------------------------------------
def attention_output(x: torch.Tensor, attn: torch.Tensor, out_w: torch.Tensor, out_b: torch.Tensor,
                     norm_w: torch.Tensor, norm_b: torch.Tensor, eps: float) -> torch.Tensor:
    """Post-LN after the attention's output projection and its residual."""
    attn = attn.reshape(x.shape[0], -1)
    return F.layer_norm(F.linear(attn, out_w, out_b) + x, (x.shape[-1],), norm_w, norm_b, eps)


def gated_mlp(x: torch.Tensor, gated_w: torch.Tensor, wo_w: torch.Tensor, wo_b: torch.Tensor,
              norm_w: torch.Tensor, norm_b: torch.Tensor, inner: int, eps: float) -> torch.Tensor:
    """GLU (exact GELU on the first half, no bias on ``gated_layers``), residual, post-LN."""
    gated, linear = F.linear(x, gated_w).split(inner, dim=-1)  # (T, I) each
    return F.layer_norm(F.linear(F.gelu(gated) * linear, wo_w, wo_b) + x, (x.shape[-1],),
                        norm_w, norm_b, eps)


class LayerKernels:
    """The per-layer functions around attention (``eager``); ``compiled`` is their
    ``torch.compile``d form (residual, LayerNorm, GELU and gate fused; dynamic in the token
    count, one compilation shared by every layer); ``triton`` (:class:`TritonKernels`, CUDA)
    uses hand-written kernels instead."""

    kind = "eager"
    attention_output = staticmethod(attention_output)
    gated_mlp = staticmethod(gated_mlp)


class TritonKernels(LayerKernels):
    """Triton residual + LayerNorm and GLU gate kernels (:mod:`.pointwise_triton`) between
    the GEMMs: no ``torch.compile`` wrapper per call (its host overhead, ~0.3–0.6 ms a call,
    was comparable to DNABERT-S's GPU time per layer)."""

    kind = "triton"

    def __init__(self):
        from gpuengine.models import pointwise_triton as pt

        self._residual_layer_norm = pt.residual_layer_norm
        self._gelu_mul = pt.gelu_mul

    def attention_output(self, x, attn, out_w, out_b, norm_w, norm_b, eps):
        y = F.linear(attn.reshape(x.shape[0], -1), out_w, out_b)
        return self._residual_layer_norm(x, y, norm_w, norm_b, eps)

    def gated_mlp(self, x, gated_w, wo_w, wo_b, norm_w, norm_b, inner, eps):
        hidden = self._glu(x, gated_w, inner)
        return self._residual_layer_norm(x, F.linear(hidden, wo_w, wo_b), norm_w, norm_b, eps)

    def _glu(self, x, gated_w, inner):
        return self._gelu_mul(F.linear(x, gated_w), inner)


class FusedGluKernels(TritonKernels):
    """``triton`` with the gated GEMM and the GLU gate in one kernel
    (:func:`.gemm_triton.linear_glu`): the (T, 2·I) projection is never written."""

    kind = "triton-fused-glu"

    def __init__(self):
        super().__init__()
        from gpuengine.models.gemm_triton import linear_glu

        self._glu = linear_glu


KERNEL_KINDS = ("eager", "compiled", "triton", "triton-fused-glu")
EAGER = LayerKernels()


def layer_kernels(kind: str) -> LayerKernels:
    if kind == "triton":
        return TritonKernels()
    if kind == "triton-fused-glu":
        return FusedGluKernels()
    kernels = LayerKernels()
    if kind == "compiled":
        kernels.kind = kind
        kernels.attention_output = torch.compile(attention_output, dynamic=True)
        kernels.gated_mlp = torch.compile(gated_mlp, dynamic=True)
    elif kind != "eager":
        raise ValueError(f"unknown kernel kind {kind!r}; choose one of {', '.join(KERNEL_KINDS)}")
    return kernels


class DnabertSLayer(nn.Module):
    def __init__(self, cfg: DnabertSConfig):
        super().__init__()
        d, inner = cfg.embed_dim, cfg.intermediate_size
        self.heads, self.head_dim, self.inner = cfg.attention_heads, cfg.head_dim, inner
        self.eps = cfg.layer_norm_eps
        self.wqkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.gated = nn.Linear(d, 2 * inner, bias=False)
        self.wo = nn.Linear(inner, d)
        self.mlp_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def qkv(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """The fused projection (T, 3d); with ``rows`` > T it is written into the first T rows
        of a (rows, 3d) buffer whose remaining rows are zero (an attention kernel that works on
        padded rows then reads q, k and v in place, without a padded copy of each)."""
        total = x.shape[0]
        if rows == total:
            return self.wqkv(x)
        out = x.new_empty(rows, self.wqkv.out_features)
        out[total:].zero_()
        torch.addmm(self.wqkv.bias, x, self.wqkv.weight.t(), out=out[:total])
        return out

    def forward(self, x: torch.Tensor, layout: PackedLayout, attention,
                kernels: LayerKernels | None = None) -> torch.Tensor:
        kernels = kernels or EAGER
        total = x.shape[0]
        rows = getattr(attention, "rows", total)
        qkv = self.qkv(x, rows).view(rows, 3, self.heads, self.head_dim)  # (rows, 3, H, D)
        q, k, v = qkv.unbind(1)  # each (rows, H, D); head h = columns h·D … h·D + D − 1 of its block
        if attention.prescale_q:
            q = q * self.head_dim ** -0.5
        attn = attention(q, k, v, layout)  # (T, H, D)
        x = kernels.attention_output(x, attn, self.attn_out.weight, self.attn_out.bias,
                                     self.attn_norm.weight, self.attn_norm.bias, self.eps)
        return kernels.gated_mlp(x, self.gated.weight, self.wo.weight, self.wo.bias,
                                 self.mlp_norm.weight, self.mlp_norm.bias, self.inner, self.eps)


class DnabertS(nn.Module):
    """Packed DNABERT-S encoder; load weights with
    :func:`gpuengine.models.dnabert_s_weights.build_dnabert_s`."""

    family = "dnabert-s"

    def __init__(self, cfg: DnabertSConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        # No random init (see Esm2): built on the meta device, the weights assigned after.
        self.word_embeddings = nn.Embedding(cfg.vocab_size, d,
                                            _weight=torch.empty(cfg.vocab_size, d))
        self.token_type0 = nn.Parameter(torch.zeros(d))
        """Row 0 of ``token_type_embeddings`` (every token has type 0)."""
        self.emb_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(DnabertSLayer(cfg) for _ in range(cfg.num_layers))
        self._attention: dict[tuple[str, torch.dtype], object] = {}
        self.kernels = EAGER

    def set_kernels(self, kind: str) -> None:
        self.kernels = layer_kernels(kind)

    def fastest_kernels(self, device: torch.device, attention) -> str:
        return "triton" if triton_available(device) else "compiled"

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def select_attention(self, device: torch.device, dtype: torch.dtype, kind: str = "auto"):
        return select_alibi_attention(device, dtype, kind)

    def _alibi_attention(self, attention, device: torch.device, dtype: torch.dtype):
        if getattr(attention, "alibi", False):
            return attention
        key = (str(device), dtype)
        if key not in self._attention:
            self._attention[key] = self.select_attention(device, dtype)
            log.debug("DNABERT-S: %s has no ALiBi; using %s on %s", type(attention).__name__,
                      type(self._attention[key]).__name__, device)
        return self._attention[key]

    def forward(self, token_ids: torch.Tensor, layout: PackedLayout, layers: Sequence[int],
                attention) -> dict[int, torch.Tensor]:
        """Representations (T, d) of the requested non-negative ``layers`` (0 = embeddings)."""
        wanted = set(layers)
        dtype = self.word_embeddings.weight.dtype
        x = self.emb_norm(self.word_embeddings(token_ids) + self.token_type0)  # (T, d)
        reps = {0: x} if 0 in wanted else {}
        if max(wanted) == 0:
            return reps
        attention = self._alibi_attention(attention, token_ids.device, dtype)
        bound = attention.bind(layout, self.cfg.attention_heads, dtype)  # per-batch bias / mask
        for index, layer in enumerate(self.layers[: max(wanted)]):
            x = layer(x, layout, bound, self.kernels)
            if index + 1 in wanted:
                reps[index + 1] = x
        return reps
