"""Read DNABERT-S weights from a Hugging Face directory and build :class:`DnabertS`.

The directory holds ``config.json`` (``model_type`` "bert", MosaicBERT fields), the weights
(``model.safetensors`` or ``pytorch_model.bin``, sharded or not; a ``.bin`` is read with
``torch.load(weights_only=True)``, never unpickling code) and ``tokenizer.json``. No remote
code is imported or run.

State-dict names are the authors' ``BertModel`` names; a leading ``bert.`` (a ``BertForMaskedLM``
checkpoint) is stripped, ``cls.*`` (MLM head) and ``pooler.*`` are ignored, and any other missing
or unexpected key is an error that names it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from gpuengine.errors import ModelLoadError
from gpuengine.models.dnabert_s import DnabertS, DnabertSConfig
from gpuengine.models.esm2_weights import _short, read_hf_weights, safe_torch_load

_IGNORED = re.compile(r"^(cls\.|pooler\.)")
_LAYER_KEYS = (
    "attention.self.Wqkv.weight", "attention.self.Wqkv.bias",
    "attention.output.dense.weight", "attention.output.dense.bias",
    "attention.output.LayerNorm.weight", "attention.output.LayerNorm.bias",
    "mlp.gated_layers.weight",
    "mlp.wo.weight", "mlp.wo.bias",
    "mlp.layernorm.weight", "mlp.layernorm.bias",
)
_LAYER_TO_OURS = {
    "attention.self.Wqkv": "wqkv", "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm", "mlp.gated_layers": "gated", "mlp.wo": "wo",
    "mlp.layernorm": "mlp_norm",
}


def read_dnabert_s(directory: Path) -> tuple[DnabertSConfig, dict[str, torch.Tensor], bool]:
    """Config, state dict (``BertModel`` names, no prefix, heads dropped) and whether the
    directory is a gpuengine random-weight checkpoint. Key problems are reported here already."""
    directory = Path(directory)
    config_file = directory / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config_file}: {exc}") from None
    cfg = config_from_json(config, directory)
    state = strip_names(read_hf_weights(directory))
    check_keys(cfg, state)
    return cfg, state, "gpuengine_synthetic" in config


def config_from_json(config: dict, where: Path | str) -> DnabertSConfig:
    problems = []
    if config.get("model_type") != "bert":
        problems.append(f"model_type is {config.get('model_type')!r}, not 'bert'")
    if config.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act is {config.get('hidden_act')!r}, not 'gelu' (exact GELU)")
    try:
        cfg = DnabertSConfig(
            num_layers=int(config["num_hidden_layers"]), embed_dim=int(config["hidden_size"]),
            attention_heads=int(config["num_attention_heads"]),
            intermediate_size=int(config["intermediate_size"]),
            vocab_size=int(config["vocab_size"]),
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)))
    except KeyError as exc:
        problems.append(f"config.json lacks {exc.args[0]!r}")
        cfg = None
    except (TypeError, ValueError) as exc:
        problems.append(str(exc))
        cfg = None
    if problems:
        raise ModelLoadError(f"{where} is not a DNABERT-S model: " + "; ".join(problems))
    return cfg


def strip_names(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a leading ``bert.``, then the ignored ``cls.*`` / ``pooler.*`` tensors."""
    state = {k.removeprefix("bert."): v for k, v in raw.items()}
    return {k: v for k, v in state.items() if not _IGNORED.match(k)}


def expected_keys(cfg: DnabertSConfig) -> set[str]:
    keys = {"embeddings.word_embeddings.weight", "embeddings.token_type_embeddings.weight",
            "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"}
    for i in range(cfg.num_layers):
        keys |= {f"encoder.layer.{i}.{name}" for name in _LAYER_KEYS}
    return keys


def check_keys(cfg: DnabertSConfig, state: dict[str, torch.Tensor]) -> None:
    expected = expected_keys(cfg)
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ModelLoadError("DNABERT-S weights do not match the architecture: "
                             + (f"missing {_short(missing)}; " if missing else "")
                             + (f"unexpected {_short(unexpected)}" if unexpected else ""))


def build_dnabert_s(cfg: DnabertSConfig, state: dict[str, torch.Tensor],
                    dtype: torch.dtype) -> DnabertS:
    """The packed model with ``state`` (names as :func:`read_dnabert_s` returns them) loaded and
    cast to ``dtype``; missing/unexpected keys and wrong shapes are errors that name them."""
    state = strip_names(state)
    check_keys(cfg, state)
    types = state["embeddings.token_type_embeddings.weight"]
    if tuple(types.shape) != (cfg.type_vocab_size, cfg.embed_dim):
        raise ModelLoadError(f"weight embeddings.token_type_embeddings.weight has shape "
                             f"{tuple(types.shape)}, the config implies "
                             f"{(cfg.type_vocab_size, cfg.embed_dim)}")
    ours = {
        "word_embeddings.weight": state["embeddings.word_embeddings.weight"],
        "token_type0": types[0],
        "emb_norm.weight": state["embeddings.LayerNorm.weight"],
        "emb_norm.bias": state["embeddings.LayerNorm.bias"],
    }
    for i in range(cfg.num_layers):
        for key in _LAYER_KEYS:
            module, param = key.rsplit(".", 1)
            ours[f"layers.{i}.{_LAYER_TO_OURS[module]}.{param}"] = state[f"encoder.layer.{i}.{key}"]
    with torch.device("meta"):
        model = DnabertS(cfg)
    for name, param in model.state_dict().items():
        if tuple(ours[name].shape) != tuple(param.shape):
            raise ModelLoadError(f"DNABERT-S weight for {name} has shape {tuple(ours[name].shape)}, "
                                 f"the config implies {tuple(param.shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in ours.items()}, assign=True)
    return model.eval().requires_grad_(False)


def weight_names(directory: Path) -> set[str]:
    """Tensor names of a HF directory's weights without reading tensor data where the format
    allows (safetensors headers, index files; a zip ``.bin`` is memory-mapped)."""
    directory = Path(directory)
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).exists():
            return set(json.loads((directory / index).read_text())["weight_map"])
    if (directory / "model.safetensors").exists():
        from safetensors import safe_open

        with safe_open(directory / "model.safetensors", framework="pt") as handle:
            return set(handle.keys())
    if (directory / "pytorch_model.bin").exists():
        data = safe_torch_load(directory / "pytorch_model.bin")
        return set(data) if isinstance(data, dict) else set()
    return set()


def is_dnabert_s_directory(directory: Path) -> bool:
    """A MosaicBERT/DNABERT directory: ``tokenizer.json`` and fused ``Wqkv`` attention weights."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").exists():
        return False
    return any(name.endswith("attention.self.Wqkv.weight") for name in weight_names(directory))
