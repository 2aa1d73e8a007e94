"""Read ESM-2 weights (fair-esm ``.pt`` or a Hugging Face directory) and build :class:`Esm2`.

Both readers return the config and a state dict in fair-esm's names (after fair-esm's own
"upgrade" step, which strips ``encoder.sentence_encoder.`` / ``encoder.``); :func:`build_esm2`
maps those onto the packed model, fusing q/k/v, and diffs expected against found keys.

A Hugging Face directory is read by transformers itself (``EsmModel.from_pretrained`` on the
CPU, then its ``state_dict()``), not by parsing the file keys: whatever file layout the
installed transformers writes and reads (``LayerNorm.gamma/beta``, a shared ``inv_freq``, …),
we read too.

Nothing is unpickled beyond tensors and plain containers: fair-esm checkpoints hold their config
as an ``argparse.Namespace``, which is the only class allowed besides what
``torch.load(weights_only=True)`` allows by default; transformers reads ``.bin`` files with
``weights_only=True`` as well, and no remote code is ever run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
from pathlib import Path

import torch

from gpuengine.errors import ModelLoadError
from gpuengine.models.esm2 import Esm2, Esm2Config

log = logging.getLogger(__name__)

_FAIR_ESM_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
_UNUSED = re.compile(r"^(lm_head\.|contact_head\.)")


def safe_torch_load(path: Path, extra_globals: list | tuple = ()) -> object:
    """``torch.load`` with ``weights_only=True`` and a short allowlist; a refused global or a
    file that is no checkpoint becomes a ModelLoadError that says so."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *extra_globals]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        text = str(exc)
        match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if match:
            reason = (f"it contains the Python object {match.group(1)}, which gpuengine does not "
                      "unpickle (only tensors and plain containers are loaded, never code)")
        elif re.search(r"Unsupported operand|invalid load key|could not find|not a zip|"
                       r"failed finding central directory|PytorchStreamReader", text) \
                or isinstance(exc, EOFError):
            reason = "it is not a PyTorch checkpoint file (or it is truncated)"
        else:
            reason = f"{exc.__class__.__name__}: {text.splitlines()[0][:200] if text else ''}"
        raise ModelLoadError(f"cannot read checkpoint {path}: {reason}") from None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def read_fair_esm_checkpoint(path: Path) -> tuple[Esm2Config, dict[str, torch.Tensor], bool]:
    """Config, fair-esm-named state dict and whether the file is a gpuengine random-weight
    checkpoint, from an official-format ``esm2_*.pt`` file (no contact-regression file needed)."""
    data = safe_torch_load(path)
    if not isinstance(data, dict) or "model" not in data or "cfg" not in data:
        raise ModelLoadError(f"{path} is not a fair-esm ESM-2 checkpoint (expected a dict with "
                             f"'model' and 'cfg'; found {type(data).__name__}"
                             f"{' with keys ' + str(sorted(data)) if isinstance(data, dict) else ''})")
    model_cfg = data["cfg"]["model"] if isinstance(data["cfg"], dict) else None
    get = (lambda k: getattr(model_cfg, k, None)) if not isinstance(model_cfg, dict) else model_cfg.get
    try:
        cfg = Esm2Config(num_layers=int(get("encoder_layers")),
                         embed_dim=int(get("encoder_embed_dim")),
                         attention_heads=int(get("encoder_attention_heads")))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cfg['model'] lacks ESM-2 fields ({exc})") from None
    if get("token_dropout") is False:
        raise ModelLoadError(f"{path}: token_dropout is off; only ESM-2 checkpoints are supported")
    state = {_FAIR_ESM_PREFIX.sub("", k): v for k, v in data["model"].items()}
    return cfg, state, "gpuengine_synthetic" in data


_HF_TO_FAIR = [
    (r"^embeddings\.word_embeddings\.", "embed_tokens."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.query\.", r"layers.\1.self_attn.q_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.key\.", r"layers.\1.self_attn.k_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.value\.", r"layers.\1.self_attn.v_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.rotary_embeddings\.inv_freq$",
     r"layers.\1.self_attn.rot_emb.inv_freq"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.self_attn.out_proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.LayerNorm\.", r"layers.\1.self_attn_layer_norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.fc2."),
    (r"^encoder\.layer\.(\d+)\.LayerNorm\.", r"layers.\1.final_layer_norm."),
    (r"^encoder\.emb_layer_norm_after\.", "emb_layer_norm_after."),
]
_HF_IGNORED = re.compile(r"^(lm_head\.|contact_head\.|pooler\.|embeddings\.position_ids$)")


def read_hf_esm(directory: Path) -> tuple[Esm2Config, dict[str, torch.Tensor]]:
    """Config and fair-esm-named state dict from a Hugging Face ``EsmModel`` /
    ``EsmForMaskedLM`` / ``EsmFor…`` directory, read through transformers' own loading
    (:func:`read_hf_esm_state`) so that every file layout transformers reads (per-layer or shared
    ``inv_freq``, ``LayerNorm.gamma/beta``, ``esm.`` prefixes, shards, ``.bin``) reads here."""
    config = json.loads((directory / "config.json").read_text())
    problems = []
    if config.get("model_type") not in (None, "esm"):
        problems.append(f"model_type is {config.get('model_type')!r}, not 'esm'")
    if config.get("position_embedding_type", "rotary") != "rotary":
        problems.append("position embeddings are not rotary (an ESM-1 model?)")
    if config.get("emb_layer_norm_before"):
        problems.append("emb_layer_norm_before is set (an ESM-1b model?)")
    if not config.get("token_dropout", True):
        problems.append("token_dropout is off")
    if problems:
        raise ModelLoadError(f"{directory} is not an ESM-2 model: " + "; ".join(problems))
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads")
               if not isinstance(config.get(k), int)]
    if missing:
        raise ModelLoadError(f"{directory}/config.json lacks {', '.join(missing)}")
    cfg = Esm2Config(num_layers=config["num_hidden_layers"], embed_dim=config["hidden_size"],
                     attention_heads=config["num_attention_heads"],
                     vocab_size=config.get("vocab_size", 33),
                     layer_norm_eps=config.get("layer_norm_eps", 1e-5))
    if config.get("intermediate_size", 4 * cfg.embed_dim) != 4 * cfg.embed_dim:
        raise ModelLoadError(f"{directory}: intermediate_size is not 4 x hidden_size")
    state: dict[str, torch.Tensor] = {}
    shared_inv_freq = None
    for key, value in read_hf_esm_state(directory).items():
        if key == "rotary_embeddings.inv_freq":  # transformers >= 5: one shared buffer
            shared_inv_freq = value
            continue
        for pattern, repl in _HF_TO_FAIR:
            new, n = re.subn(pattern, repl, key)
            if n:
                state[new] = value
                break
        else:
            state[key] = value  # unknown keys surface as "unexpected" in build_esm2
    for i in range(cfg.num_layers):
        name = f"layers.{i}.self_attn.rot_emb.inv_freq"
        if name not in state and shared_inv_freq is not None:
            state[name] = shared_inv_freq
    return cfg, {k: v for k, v in state.items() if not _HF_IGNORED.match(k)}


_HF_MAY_BE_MISSING = re.compile(r"^(contact_head\.|pooler\.|embeddings\.position_ids$)|inv_freq$")
"""Keys transformers may initialise itself without harm: heads we never run, the position-id
table, and ``inv_freq`` (transformers computes it when a file has none, and so do we then)."""
_HF_MAY_BE_UNEXPECTED = re.compile(r"^(?!encoder\.|embeddings\.)")
"""File keys transformers' ``EsmModel`` has no place for: any head (``lm_head``,
``classifier`` of a fine-tuned ``EsmForSequenceClassification`` …) is fine; an unplaced
``encoder.``/``embeddings.`` weight means the file is not the model its config describes."""


def read_hf_esm_state(directory: Path) -> dict[str, torch.Tensor]:
    """``EsmModel.from_pretrained(directory).state_dict()`` on the CPU — the state dict after
    transformers' own key conversions, names as transformers' ``EsmModel`` has them — with
    checks transformers only warns about: a weight of the model missing from the files (which
    transformers would fill with random values) or a file weight it cannot place is an error.

    Loading is local only (``local_files_only``), never with remote code (the ``EsmModel`` class
    is named, so ``auto_map`` is not consulted), in the files' own dtype (``"auto"``: an fp16
    checkpoint stays fp16) and without a random initialisation first: transformers 5 builds the
    model on the meta device and fills it from the (memory-mapped) files; on 4.x
    ``low_cpu_mem_usage=True`` does the same. Peak memory is at most one copy of the weights
    (transformers 5.24 leaves safetensors tensors memory-mapped: reading a 564 MiB ESM-2 150M
    directory added 27 MiB of resident memory; :func:`build_esm2` then makes the copy the
    packed model holds), so 3B and 15B directories load as their fair-esm files do."""
    import transformers
    from transformers import EsmModel

    kwargs: dict = dict(add_pooling_layer=False, output_loading_info=True, local_files_only=True)
    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs["dtype"] = "auto"
    else:
        kwargs.update(torch_dtype="auto", low_cpu_mem_usage=True)
    try:
        with _quiet_transformers():
            model, info = EsmModel.from_pretrained(str(directory), **kwargs)
    except Exception as exc:  # OSError, ValueError, RuntimeError (size mismatch), ...
        text = str(exc).strip().splitlines()
        raise ModelLoadError(f"transformers cannot load the ESM-2 model in {directory}: "
                             f"{exc.__class__.__name__}: {text[0][:300] if text else ''}") from None
    missing = sorted(k for k in info.get("missing_keys", ()) if not _HF_MAY_BE_MISSING.search(k))
    unexpected = sorted(k.removeprefix("esm.") for k in info.get("unexpected_keys", ()))
    unexpected = [k for k in unexpected if not _HF_MAY_BE_UNEXPECTED.match(k)]
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    errors = [str(e) for e in info.get("error_msgs", ())]
    if missing or unexpected or mismatched or errors:
        raise ModelLoadError(
            f"ESM-2 weights in {directory} do not match its config.json: "
            + "; ".join(part for part in (
                f"missing {_short(missing)} (transformers would initialise them randomly)"
                if missing else "",
                f"unexpected {_short(unexpected)}" if unexpected else "",
                f"wrong shape {_short(mismatched)}" if mismatched else "",
                "; ".join(errors)) if part))
    return {k: v.detach() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load report and progress bar off for the block (we report problems
    ourselves), restored after."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Tensors of a HF directory: (sharded) safetensors preferred, else (sharded) ``.bin`` read
    with ``weights_only=True``."""
    from safetensors.torch import load_file

    for index_name, loader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", safe_torch_load)):
        index = directory / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                tensors.update(loader(directory / shard))
            return tensors
    if (directory / "model.safetensors").exists():
        return load_file(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").exists():
        return safe_torch_load(directory / "pytorch_model.bin")
    raise ModelLoadError(f"{directory} has config.json but no model.safetensors or pytorch_model.bin")


def build_esm2(cfg: Esm2Config, state: dict[str, torch.Tensor], dtype: torch.dtype) -> Esm2:
    """The packed model with ``state`` loaded (fair-esm names), cast to ``dtype``; any missing or
    unexpected key is an error that names it."""
    state = {k: v for k, v in state.items() if not _UNUSED.match(k)}
    expected = {"embed_tokens.weight", "emb_layer_norm_after.weight", "emb_layer_norm_after.bias"}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        expected |= {p + s for s in (
            "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
            "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
            "self_attn.out_proj.weight", "self_attn.out_proj.bias", "self_attn.rot_emb.inv_freq",
            "self_attn_layer_norm.weight", "self_attn_layer_norm.bias", "fc1.weight", "fc1.bias",
            "fc2.weight", "fc2.bias", "final_layer_norm.weight", "final_layer_norm.bias")}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ModelLoadError("ESM-2 weights do not match the architecture: "
                             + (f"missing {_short(missing)}; " if missing else "")
                             + (f"unexpected {_short(unexpected)}" if unexpected else ""))
    with torch.device("meta"):
        model = Esm2(cfg)
    ours: dict[str, torch.Tensor] = {
        "embed_tokens.weight": state["embed_tokens.weight"],
        "final_norm.weight": state["emb_layer_norm_after.weight"],
        "final_norm.bias": state["emb_layer_norm_after.bias"],
    }
    for i in range(cfg.num_layers):
        f, o = f"layers.{i}.", f"layers.{i}."
        a = f + "self_attn."
        ours[o + "qkv.weight"] = torch.cat([state[a + n + "_proj.weight"] for n in "qkv"])
        ours[o + "qkv.bias"] = torch.cat([state[a + n + "_proj.bias"] for n in "qkv"])
        for src, dst in (("self_attn.out_proj", "out_proj"), ("self_attn_layer_norm", "attn_norm"),
                         ("fc1", "fc1"), ("fc2", "fc2"), ("final_layer_norm", "ffn_norm")):
            ours[o + dst + ".weight"] = state[f + src + ".weight"]
            ours[o + dst + ".bias"] = state[f + src + ".bias"]
        ours[o + "inv_freq"] = state[a + "rot_emb.inv_freq"].to(torch.float32)
    _check_shapes(model, ours)
    model.load_state_dict({k: v if k.endswith("inv_freq") else v.to(dtype) for k, v in ours.items()},
                          assign=True)
    model.share_rope_tables_if_equal()
    return model.eval().requires_grad_(False)


def _check_shapes(model: Esm2, tensors: dict[str, torch.Tensor]) -> None:
    for name, param in model.state_dict().items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise ModelLoadError(f"weight {name} has shape {tuple(tensors[name].shape)}, the config "
                                 f"implies {tuple(param.shape)}")


def _short(keys: list[str], limit: int = 6) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
