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
  ``model.safetensors``, per-layer ``inv_freq`` as in the hub checkpoints);
  :func:`write_hf_esm_with_transformers` — the same weights saved by the installed
  transformers' ``save_pretrained``, in whatever layout that version writes.
* :func:`outlier_stress` — the same random ESM-2 with a few LayerNorm gain channels × 30 in
  every layer, like the outlier dimensions of trained transformers (stress weights for reduced
  precisions such as FP8, whose per-token scale is set by the largest value of a row).
* :func:`write_virnucpro_mlp` — VirNucPro's MLP classifier as ``train.py`` saves it (a whole
  pickled ``__main__.MLPClassifier`` module, like the published ``300_model.pth``).

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


OUTLIER_CHANNELS = 4
OUTLIER_GAIN = 30.0


def outlier_stress(state: dict[str, torch.Tensor], *, channels: int = OUTLIER_CHANNELS,
                   gain: float = OUTLIER_GAIN, seed: int = 0) -> dict[str, torch.Tensor]:
    """``state`` with the LayerNorm gains (``weight``) of ``channels`` fixed channels (chosen by
    ``seed``) multiplied by ``gain`` in every layer's two LayerNorms: the LayerNorm outputs that
    feed q/k/v and fc1 then carry a few values ~30× larger than the rest, as trained models'
    outlier dimensions do. The final LayerNorm is left alone. Returns a new dict."""
    dim = state["embed_tokens.weight"].shape[1]
    picked = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))[:channels]
    out = dict(state)
    for key, value in state.items():
        if key.startswith("layers.") and key.endswith(("self_attn_layer_norm.weight",
                                                       "final_layer_norm.weight")):
            scaled = value.clone()
            scaled[picked.to(value.device)] *= gain
            out[key] = scaled
    return out


def write_fair_esm_checkpoint(path: str | Path, num_layers: int, embed_dim: int, heads: int, *,
                              seed: int = 0, dtype: torch.dtype = torch.float32,
                              regression_file: bool = True, stress: bool = False) -> Path:
    """Write ``path`` (its stem should start with ``esm2`` for fair-esm's own loader);
    ``stress``: with :func:`outlier_stress` applied."""
    state = random_esm2_state(num_layers, embed_dim, heads, seed=seed, dtype=dtype)
    if stress:
        state = outlier_stress(state, seed=seed)
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


def _hf_esm_config(num_layers: int, embed_dim: int, heads: int, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["EsmModel"], "model_type": "esm", "vocab_size": 33,
        "hidden_size": embed_dim, "num_hidden_layers": num_layers,
        "num_attention_heads": heads, "intermediate_size": 4 * embed_dim,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 1026, "position_embedding_type": "rotary",
        "layer_norm_eps": 1e-5, "emb_layer_norm_before": False, "token_dropout": True,
        "pad_token_id": 1, "mask_token_id": 32, "is_folding_model": False,
        "torch_dtype": str(dtype).removeprefix("torch."), "gpuengine_synthetic": SYNTHETIC_NOTE,
    }


def write_hf_esm(directory: str | Path, num_layers: int, embed_dim: int, heads: int, *,
                 seed: int = 0, dtype: torch.dtype = torch.float32, stress: bool = False) -> Path:
    """Write a Hugging Face ``EsmModel`` directory with the same weights as
    :func:`write_fair_esm_checkpoint` for the same arguments, in the hub checkpoints' layout
    (per-layer ``inv_freq``, ``LayerNorm.weight/bias``)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = random_esm2_state(num_layers, embed_dim, heads, seed=seed, dtype=dtype)
    if stress:
        state = outlier_stress(state, seed=seed)
    tensors = {k: v.contiguous().clone() for k, v in hf_esm_state(state).items()}
    save_file(tensors, directory / "model.safetensors")
    config = _hf_esm_config(num_layers, embed_dim, heads, dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def write_hf_esm_with_transformers(directory: str | Path, num_layers: int, embed_dim: int,
                                   heads: int, *, seed: int = 0,
                                   dtype: torch.dtype = torch.float32,
                                   model_class: str = "EsmModel") -> Path:
    """The same weights as :func:`write_hf_esm`, written by the *installed* transformers'
    ``save_pretrained`` (``model_class`` ``EsmModel``, ``EsmForMaskedLM`` or
    ``EsmForSequenceClassification``, as a fine-tuning user would save it): whatever file layout
    that version writes (transformers 5: ``LayerNorm.gamma/beta`` and one shared
    ``encoder.layer.*.attention.self.rotary_embeddings.inv_freq`` key). Small shapes only: the
    model is built in memory with transformers' random init first."""
    import transformers

    config = _hf_esm_config(num_layers, embed_dim, heads, dtype)
    config["architectures"] = [model_class]
    esm_config = transformers.EsmConfig(**{k: v for k, v in config.items()
                                           if k not in ("torch_dtype", "architectures")})
    cls = getattr(transformers, model_class)
    model = cls(esm_config) if model_class != "EsmModel" else cls(esm_config, add_pooling_layer=False)
    base = model if model_class == "EsmModel" else model.esm
    state = hf_esm_state(random_esm2_state(num_layers, embed_dim, heads, seed=seed))
    missing, unexpected = base.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("contact_head.") and "position_ids" not in k]
    if missing or unexpected:
        raise RuntimeError(f"transformers' EsmModel does not take the random state: missing "
                           f"{missing}, unexpected {unexpected}")
    directory = Path(directory)
    model.to(dtype).save_pretrained(directory)
    written = json.loads((directory / "config.json").read_text())
    written["gpuengine_synthetic"] = SYNTHETIC_NOTE
    (directory / "config.json").write_text(json.dumps(written, indent=2) + "\n")
    return directory


# -- DNABERT-S ---------------------------------------------------------------------------------------

DNABERT_S_SHAPE = (12, 768, 12, 3072, 4096)
"""DNABERT-S (and DNABERT-2-117M): layers, hidden size, heads, intermediate size, vocabulary."""


def random_dnabert_state(num_layers: int, embed_dim: int, intermediate: int, vocab: int, *,
                         seed: int = 0, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu",
                         masked_lm: bool = False) -> dict[str, torch.Tensor]:
    """A DNABERT-S state dict in the authors' ``BertModel`` names (``pooler.dense`` included),
    or with ``masked_lm`` a ``BertForMaskedLM`` one (``bert.`` prefix, ``cls.predictions.*``,
    no pooler). Random values of O(1) activations; post-LN keeps any depth finite."""
    gen = torch.Generator(device=device).manual_seed(seed)
    d = embed_dim

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device) * std

    def linear(prefix: str, fan_out: int, fan_in: int, bias: bool = True) -> dict[str, torch.Tensor]:
        out = {prefix + ".weight": normal(fan_out, fan_in, std=1 / math.sqrt(fan_in))}
        if bias:
            out[prefix + ".bias"] = normal(fan_out, std=0.05)
        return out

    def norm(prefix: str) -> dict[str, torch.Tensor]:
        return {prefix + ".weight": 1 + normal(d, std=0.1), prefix + ".bias": normal(d, std=0.1)}

    state = {"embeddings.word_embeddings.weight": normal(vocab, d, std=1.0),
             "embeddings.token_type_embeddings.weight": normal(2, d, std=0.5)}
    state.update(norm("embeddings.LayerNorm"))
    for i in range(num_layers):
        p = f"encoder.layer.{i}."
        state.update(linear(p + "attention.self.Wqkv", 3 * d, d))
        state.update(linear(p + "attention.output.dense", d, d))
        state.update(norm(p + "attention.output.LayerNorm"))
        state.update(linear(p + "mlp.gated_layers", 2 * intermediate, d, bias=False))
        state.update(linear(p + "mlp.wo", d, intermediate))
        state.update(norm(p + "mlp.layernorm"))
    if not masked_lm:
        state.update(linear("pooler.dense", d, d))
        return {k: v.to(dtype) for k, v in state.items()}
    state = {"bert." + k: v for k, v in state.items()}
    state.update(linear("cls.predictions.transform.dense", d, d))
    state.update(norm("cls.predictions.transform.LayerNorm"))
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    state["cls.predictions.decoder.bias"] = torch.zeros(vocab, device=device)
    state["cls.predictions.bias"] = torch.zeros(vocab, device=device)
    return {k: v.to(dtype) for k, v in state.items()}


def write_dna_tokenizer(path: str | Path, vocab: int, *, seed: int = 0) -> Path:
    """A DNABERT-style ``tokenizer.json``: a BPE trained here on random DNA (vocabulary ≤
    ``vocab``) with the hub file's settings — [UNK]=0 [CLS]=1 [SEP]=2 [PAD]=3 [MASK]=4, A=5 C=6
    G=7 T=8, no normaliser, ``Whitespace`` pre-tokenizer, ``fuse_unk`` off, no byte fallback,
    ``TemplateProcessing`` "[CLS] $A [SEP]", and the embedded padding (Fixed 2000, pad id 3) and
    truncation (2000) that a loader must switch off."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    if vocab < len(specials) + 4:
        raise ValueError(f"vocab {vocab} cannot hold the 5 special tokens and A, C, G, T")
    rng = np.random.default_rng(seed)
    bases = np.frombuffer(b"ACGT", dtype=np.uint8)
    corpus = [bases[rng.integers(0, 4, 1000)].tobytes().decode()
              for _ in range(max(64, vocab // 8))]
    tok = Tokenizer(models.BPE(unk_token="[UNK]", fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                  initial_alphabet=list("ACGT"), limit_alphabet=4,
                                  min_frequency=1, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok.enable_padding(length=2000, pad_id=3, pad_token="[PAD]")
    tok.enable_truncation(max_length=2000)
    ids = [tok.token_to_id(t) for t in specials + list("ACGT")]
    if ids != list(range(9)):
        raise RuntimeError(f"trained tokenizer has ids {ids} for the specials and bases, not 0..8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def write_dnabert_s(directory: str | Path, num_layers: int = 12, embed_dim: int = 768,
                    heads: int = 12, intermediate: int = 3072, vocab: int = 4096, *,
                    seed: int = 0, dtype: torch.dtype = torch.float32,
                    with_bert_prefix: bool = False, tokenizer: bool = True) -> Path:
    """A DNABERT-S directory as the hub publishes it: ``config.json`` (the hub's values with
    these sizes, marked synthetic), ``model.safetensors`` (``BertModel`` names, or with
    ``with_bert_prefix`` a ``BertForMaskedLM`` state dict) and a trained ``tokenizer.json``."""
    from safetensors.torch import save_file

    if embed_dim % heads:
        raise ValueError(f"embed_dim {embed_dim} is not a multiple of heads {heads}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = random_dnabert_state(num_layers, embed_dim, intermediate, vocab, seed=seed,
                                 dtype=dtype, masked_lm=with_bert_prefix)
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
    config = {
        "_name_or_path": "zhihan1996/DNABERT-2-117M", "alibi_starting_size": 512,
        "architectures": ["BertForMaskedLM" if with_bert_prefix else "BertModel"],
        "attention_probs_dropout_prob": 0.0,
        "auto_map": {"AutoConfig": "configuration_bert.BertConfig",
                     "AutoModel": "bert_layers.BertModel",
                     "AutoModelForMaskedLM": "bert_layers.BertForMaskedLM",
                     "AutoModelForSequenceClassification": "bert_layers.BertForSequenceClassification"},
        "classifier_dropout": None, "gradient_checkpointing": False, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": embed_dim, "initializer_range": 0.02,
        "intermediate_size": intermediate, "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": heads,
        "num_hidden_layers": num_layers, "pad_token_id": 0, "position_embedding_type": "absolute",
        "torch_dtype": str(dtype).removeprefix("torch."), "transformers_version": "4.28.0",
        "type_vocab_size": 2, "use_cache": True, "vocab_size": vocab,
        "gpuengine_synthetic": SYNTHETIC_NOTE,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer:
        write_dna_tokenizer(directory / "tokenizer.json", vocab, seed=seed)
    return directory


# -- VirNucPro's classifier ---------------------------------------------------------------------

VIRNUCPRO_MLP_INPUT = 768 + 2560
"""The published classifiers' input: DNABERT-S mean (768) + ESM-2 3B layer-36 mean (2560)."""


def _training_script_class():
    """The training script's ``MLPClassifier`` (VirNucPro ``train.py``), defined afresh so that
    its pickled form names ``__main__.MLPClassifier`` exactly as the published files do."""
    from torch import nn
    import torch.nn.functional as F

    class MLPClassifier(nn.Module):
        def __init__(self, input_dim, hidden_dim, num_class):
            super().__init__()
            self.hidden_layer = nn.Linear(input_dim, hidden_dim)
            self.bn1 = nn.BatchNorm1d(hidden_dim)
            self.output_layer = nn.Linear(hidden_dim, num_class)
            self.dropout = nn.Dropout(0.5)

        def forward(self, x):
            x = F.relu(self.bn1(self.hidden_layer(x)))
            return self.output_layer(self.dropout(x))

    MLPClassifier.__module__ = "__main__"
    MLPClassifier.__qualname__ = "MLPClassifier"
    return MLPClassifier


def random_virnucpro_mlp(input_dim: int = VIRNUCPRO_MLP_INPUT, hidden: int = 512, *,
                         seed: int = 0) -> torch.nn.Module:
    """A training-script ``MLPClassifier`` with random weights and non-trivial BatchNorm
    statistics (so eval mode matters), in eval mode."""
    with torch.random.fork_rng(devices=[]):  # the biases' default init, seeded, RNG untouched
        torch.manual_seed(seed)
        model = _training_script_class()(input_dim, hidden, 2)
    model.gpuengine_synthetic = SYNTHETIC_NOTE  # a plain attribute: unpickles as a str
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in (model.hidden_layer, model.output_layer):
            bound = math.sqrt(6 / (linear.in_features + linear.out_features))  # xavier, as train.py
            linear.weight.copy_((torch.rand(linear.weight.shape, generator=gen) * 2 - 1) * bound)
        model.output_layer.weight.mul_(4.0)
        model.bn1.weight.copy_(0.5 + torch.rand(hidden, generator=gen))
        model.bn1.bias.copy_(0.4 * torch.rand(hidden, generator=gen) - 0.2)
        model.bn1.running_mean.copy_(torch.rand(hidden, generator=gen) - 0.5)
        model.bn1.running_var.copy_(0.2 + 2.8 * torch.rand(hidden, generator=gen))
        model.bn1.num_batches_tracked.fill_(1000)
    return model.eval()


def write_virnucpro_mlp(path: str | Path, input_dim: int = VIRNUCPRO_MLP_INPUT,
                        hidden: int = 512, *, seed: int = 0) -> Path:
    """Write a random VirNucPro classifier in the published ``300_model.pth`` /
    ``500_model.pth`` format: ``torch.save(model)`` of the whole module, its class pickled as
    ``__main__.MLPClassifier`` (gpuengine reads it without running code from it). The input
    size is ``DNABERT-S dim + ESM-2 dim`` of the models it goes with: 3328 for the published
    ones. The module carries a ``gpuengine_synthetic`` attribute (a string, harmless to the
    original tool's ``torch.load``), so gpuengine warns that its scores mean nothing."""
    import sys

    model = random_virnucpro_mlp(input_dim, hidden, seed=seed)
    cls = type(model)
    main = sys.modules["__main__"]
    missing = object()
    previous = getattr(main, cls.__name__, missing)
    setattr(main, cls.__name__, cls)  # pickle checks that __main__.MLPClassifier is this class
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.save(model, path)
    finally:
        if previous is missing:
            delattr(main, cls.__name__)
        else:
            setattr(main, cls.__name__, previous)
    return path
