"""Random-weight checkpoints in the official formats, for tests, benchmarks and the demo.

Weights cannot be downloaded everywhere (CI, air-gapped nodes), but random weights of the real
shapes cost the same compute and exercise the same loading code. Every file written here is
marked (``gpuengine_synthetic`` in the checkpoint dict / ``config.json``) so the engine warns
loudly that its embeddings mean nothing.

* :func:`write_fair_esm_checkpoint` — ``esm2_*.pt`` exactly as fair-esm publishes them: a dict
  with ``model`` (keys under ``encoder.sentence_encoder.`` / ``encoder.lm_head``) and ``cfg``
  (``{"model": argparse.Namespace(...)}``), plus the ``-contact-regression.pt`` file fair-esm's
  local loader insists on.
* :func:`write_hf_esm` — a Hugging Face ``EsmModel`` directory (``config.json`` +
  ``model.safetensors``, per-layer ``inv_freq`` as in the hub checkpoints).

``inv_freq`` is the RoPE formula rounded through fp16, like the published checkpoints, so a
loader that recomputes it instead of reading it fails the parity tests.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

ESM2_SHAPES: dict[str, tuple[int, int, int]] = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}
"""Published ESM-2 checkpoints: name → (layers, embed_dim, attention_heads)."""

SYNTHETIC_NOTE = "RANDOM WEIGHTS written by gpuengine (tools/make_checkpoint.py); not a trained model"


def random_esm2_state(num_layers: int, embed_dim: int, heads: int, *, seed: int = 0,
                      dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A full fair-esm ``ESM2`` state dict (fair-esm names, heads included) with random values
    whose scale keeps activations O(1) through any depth. ``device="cuda"`` makes a 3B state in
    seconds (benchmarks); files are always written from CPU tensors."""
    gen = torch.Generator(device=device).manual_seed(seed)
    d, vocab = embed_dim, 33

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    def linear(prefix: str, fan_out: int, fan_in: int) -> dict[str, torch.Tensor]:
        return {prefix + ".weight": normal(fan_out, fan_in, std=1 / math.sqrt(fan_in)),
                prefix + ".bias": normal(fan_out, std=0.05)}

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {prefix + ".weight": 1 + normal(d, std=0.1), prefix + ".bias": normal(d, std=0.1)}

    head_dim = d // heads
    inv_freq = (1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
                ).half().float()
    state = {"embed_tokens.weight": normal(vocab, d, std=1.0)}
    for i in range(num_layers):
        p = f"layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state.update(linear(p + "self_attn." + name, d, d))
        state[p + "self_attn.rot_emb.inv_freq"] = inv_freq.clone()
        state.update(norm(p + "self_attn_layer_norm"))
        state.update(linear(p + "fc1", 4 * d, d))
        state.update(linear(p + "fc2", d, 4 * d))
        state.update(norm(p + "final_layer_norm"))
    state.update(norm("emb_layer_norm_after"))
    state.update(linear("lm_head.dense", d, d))
    state.update(norm("lm_head.layer_norm"))
    state["lm_head.weight"] = state["embed_tokens.weight"]
    state["lm_head.bias"] = torch.zeros(vocab, device=device)
    return {k: v.to(dtype) for k, v in state.items()}


def write_fair_esm_checkpoint(path: str | Path, num_layers: int, embed_dim: int, heads: int, *,
                              seed: int = 0, dtype: torch.dtype = torch.float32,
                              regression_file: bool = True) -> Path:
    """Write ``path`` (its stem should start with ``esm2`` for fair-esm's own loader)."""
    state = random_esm2_state(num_layers, embed_dim, heads, seed=seed, dtype=dtype)
    return write_fair_esm_checkpoint_from_state(path, state, num_layers, embed_dim, heads,
                                                regression_file=regression_file)


def write_fair_esm_checkpoint_from_state(path: str | Path, state: dict[str, torch.Tensor],
                                         num_layers: int, embed_dim: int, heads: int, *,
                                         regression_file: bool = True) -> Path:
    """Write a fair-esm-named ``state`` (CPU tensors) in the official ``.pt`` layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = {}
    for key, value in state.items():
        prefix = "encoder." if key.startswith("lm_head") else "encoder.sentence_encoder."
        model[prefix + key] = value
    cfg = argparse.Namespace(encoder_layers=num_layers, encoder_embed_dim=embed_dim,
                             encoder_ffn_embed_dim=4 * embed_dim,
                             encoder_attention_heads=heads, token_dropout=True,
                             attention_dropout=0.0, dropout=0.0, max_positions=1024)
    torch.save({"model": model, "cfg": {"model": cfg}, "gpuengine_synthetic": SYNTHETIC_NOTE}, path)
    if regression_file:
        regression = {"contact_head.regression.weight": torch.zeros(1, num_layers * heads),
                      "contact_head.regression.bias": torch.zeros(1)}
        torch.save({"model": regression}, path.with_name(path.stem + "-contact-regression.pt"))
    return path


_FAIR_TO_HF = [
    ("embed_tokens.", "embeddings.word_embeddings."),
    ("self_attn.q_proj.", "attention.self.query."),
    ("self_attn.k_proj.", "attention.self.key."),
    ("self_attn.v_proj.", "attention.self.value."),
    ("self_attn.rot_emb.inv_freq", "attention.self.rotary_embeddings.inv_freq"),
    ("self_attn.out_proj.", "attention.output.dense."),
    ("self_attn_layer_norm.", "attention.LayerNorm."),
    ("fc1.", "intermediate.dense."),
    ("fc2.", "output.dense."),
    ("final_layer_norm.", "LayerNorm."),
    ("emb_layer_norm_after.", "encoder.emb_layer_norm_after."),
]


def hf_esm_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fair-esm names → Hugging Face ``EsmModel`` names (heads dropped)."""
    out = {}
    for key, value in state.items():
        if key.startswith("lm_head"):
            continue
        new = key
        for old, hf in _FAIR_TO_HF:
            if old in new:
                new = new.replace(old, hf)
                break
        if new.startswith("layers."):
            new = "encoder.layer." + new.removeprefix("layers.")
        out[new] = value
    return out


def write_hf_esm(directory: str | Path, num_layers: int, embed_dim: int, heads: int, *,
                 seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a Hugging Face ``EsmModel`` directory with the same weights as
    :func:`write_fair_esm_checkpoint` for the same arguments."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = random_esm2_state(num_layers, embed_dim, heads, seed=seed, dtype=dtype)
    tensors = {k: v.contiguous().clone() for k, v in hf_esm_state(state).items()}
    save_file(tensors, directory / "model.safetensors")
    config = {
        "architectures": ["EsmModel"], "model_type": "esm", "vocab_size": 33,
        "hidden_size": embed_dim, "num_hidden_layers": num_layers,
        "num_attention_heads": heads, "intermediate_size": 4 * embed_dim,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 1026, "position_embedding_type": "rotary",
        "layer_norm_eps": 1e-5, "emb_layer_norm_before": False, "token_dropout": True,
        "pad_token_id": 1, "mask_token_id": 32, "is_folding_model": False,
        "torch_dtype": str(dtype).removeprefix("torch."), "gpuengine_synthetic": SYNTHETIC_NOTE,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
