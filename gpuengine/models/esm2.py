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

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gpuengine.models.attention import PackedLayout, PaddedAttention, VarlenAttention
from gpuengine.models.rotary import apply_rotary, rotary_tables

TOKEN_DROPOUT_SCALE = 1 - 0.15 * 0.8
"""fair-esm's ``(1 - mask_ratio_train) / (1 - 0)`` for inputs without ``<mask>``: 0.88."""


@dataclass(frozen=True)
class Esm2Config:
    num_layers: int
    embed_dim: int
    attention_heads: int
    vocab_size: int = 33
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.embed_dim % self.attention_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of "
                             f"attention_heads {self.attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads


class Esm2Layer(nn.Module):
    def __init__(self, cfg: Esm2Config):
        super().__init__()
        d = cfg.embed_dim
        self.heads, self.head_dim = cfg.attention_heads, cfg.head_dim
        self.scaling = self.head_dim ** -0.5
        self.attn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.register_buffer("inv_freq", torch.zeros(self.head_dim // 2, dtype=torch.float32))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                layout: PackedLayout, attention: PaddedAttention | VarlenAttention) -> torch.Tensor:
        total = x.shape[0]
        qkv = self.qkv(self.attn_norm(x)).view(total, 3, self.heads, self.head_dim)  # (T, 3, H, D)
        q, k, v = qkv.unbind(1)
        if attention.prescale_q:
            q = q * self.scaling
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        attn = attention(q, k, v.contiguous(), layout).reshape(total, -1)  # (T, d)
        x = x + self.out_proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.ffn_norm(x))))


class Esm2(nn.Module):
    """Packed ESM-2 encoder. Load weights with :func:`gpuengine.models.esm2_weights.load_esm2`."""

    family = "esm2"

    def __init__(self, cfg: Esm2Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.layers = nn.ModuleList(Esm2Layer(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def forward(self, token_ids: torch.Tensor, layout: PackedLayout, layers: Sequence[int],
                attention: PaddedAttention | VarlenAttention) -> dict[int, torch.Tensor]:
        """Representations (T, d) of the requested non-negative ``layers`` (0 = embeddings)."""
        wanted = set(layers)
        x = self.embed_tokens(token_ids) * TOKEN_DROPOUT_SCALE  # (T, d)
        reps = {0: x} if 0 in wanted else {}
        tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for index, layer in enumerate(self.layers[: max(wanted)]):
            key = id(layer.inv_freq) if not self._shared_rope else 0
            if key not in tables:
                tables[key] = rotary_tables(layout.positions, layer.inv_freq)
            x = layer(x, tables[key], layout, attention)
            if index + 1 in wanted:
                reps[index + 1] = self.final_norm(x) if index + 1 == self.num_layers else x
        return reps

    _shared_rope = False

    def share_rope_tables_if_equal(self) -> None:
        """Compute cos/sin once per batch when every layer stores the same inv_freq (the usual
        case); otherwise each layer keeps its own."""
        first = self.layers[0].inv_freq
        self._shared_rope = all(torch.equal(first, layer.inv_freq) for layer in self.layers)
