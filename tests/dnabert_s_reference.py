"""An independent line-by-line reading of the DNABERT-S authors' ``bert_layers.py`` (fp32,
padded): the reference the packed model is held to (max |ours - reference| <= 1e-5).

It imports nothing from ``gpuengine``: it reads the safetensors file, config.json and
tokenizer.json itself and runs the padded architecture as the original code does (-10000 key
padding bias, ALiBi table, divide by sqrt(head_dim), fp32).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F


def raw_tokenizer(directory: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def reference_slopes(n_heads: int) -> list[float]:
    """MosaicBERT's ``_get_alibi_head_slopes``, restated."""
    def power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_2(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_2(closest) + reference_slopes(2 * closest)[0::2][: n_heads - closest]


def reference_forward(directory: Path, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Hidden states [embeddings, layer 1, …, layer N], each (B, S, d), of the padded batch."""
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())
    sd = {k.removeprefix("bert."): v.float() for k, v in load_file(directory / "model.safetensors").items()}
    d, heads = config["hidden_size"], config["num_attention_heads"]
    head_size, inner, eps = d // heads, config["intermediate_size"], config["layer_norm_eps"]
    batch, seqlen = input_ids.shape

    def ln(x, name):
        return F.layer_norm(x, (d,), sd[name + ".weight"], sd[name + ".bias"], eps)

    token_type_ids = torch.zeros_like(input_ids)
    emb = sd["embeddings.word_embeddings.weight"][input_ids] \
        + sd["embeddings.token_type_embeddings.weight"][token_type_ids]
    hidden = ln(emb, "embeddings.LayerNorm")
    ext = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0
    ctx = torch.arange(seqlen)[:, None]
    mem = torch.arange(seqlen)[None, :]
    relative = torch.abs(mem - ctx).unsqueeze(0).expand(heads, -1, -1)
    slopes = torch.Tensor(reference_slopes(heads))
    alibi = (slopes.unsqueeze(1).unsqueeze(1) * -relative).unsqueeze(0)
    bias = ext + alibi
    out = [hidden]
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        qkv = hidden @ sd[p + "attention.self.Wqkv.weight"].T + sd[p + "attention.self.Wqkv.bias"]
        qkv = qkv.view(batch, seqlen, 3, heads, head_size)
        q = qkv[:, :, 0].permute(0, 2, 1, 3)
        k = qkv[:, :, 1].permute(0, 2, 3, 1)
        v = qkv[:, :, 2].permute(0, 2, 1, 3)
        scores = torch.matmul(q, k) / math.sqrt(head_size) + bias
        probs = torch.softmax(scores, dim=-1)
        attn = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(batch, seqlen, d)
        attn = attn @ sd[p + "attention.output.dense.weight"].T + sd[p + "attention.output.dense.bias"]
        hidden = ln(attn + hidden, p + "attention.output.LayerNorm")
        residual = hidden
        h = hidden @ sd[p + "mlp.gated_layers.weight"].T
        gated, non_gated = h[..., :inner], h[..., inner:]
        h = F.gelu(gated, approximate="none") * non_gated
        h = h @ sd[p + "mlp.wo.weight"].T + sd[p + "mlp.wo.bias"]
        hidden = ln(h + residual, p + "mlp.layernorm")
        out.append(hidden)
    return out


def reference_embeddings(directory: Path, sequences, layers, *, batched: bool):
    """{layer: {'mean', 'bos', 'per-token'}} pooled as the authors do (mean over all tokens,
    CLS and SEP included; mask-weighted when batched)."""
    tok = raw_tokenizer(directory)
    ids = [tok.encode(s.upper()).ids for s in sequences]
    out = {layer: {"mean": [], "bos": [], "per-token": []} for layer in layers}
    groups = [list(range(len(ids)))] if batched else [[i] for i in range(len(ids))]
    with torch.no_grad():
        for group in groups:
            width = max(len(ids[i]) for i in group)
            input_ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for row, i in enumerate(group):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            states = reference_forward(directory, input_ids, mask)
            for layer in layers:
                h = states[layer]
                m = mask[..., None].float()
                mean = (h * m).sum(1) / m.sum(1)
                for row, i in enumerate(group):
                    out[layer]["mean"].append(mean[row].numpy())
                    out[layer]["bos"].append(h[row, 0].numpy())
                    out[layer]["per-token"].append(h[row, : len(ids[i])].numpy())
    return out
