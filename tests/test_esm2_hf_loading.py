"""Hugging Face ESM-2 directories written by the *installed* transformers' ``save_pretrained``
(transformers 5: ``LayerNorm.gamma/beta`` and one shared ``inv_freq`` key) are read through
transformers' own loading: against transformers' forward and the fair-esm path, fp32 ≤ 1e-5."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import (TINY, assert_close, embed_esm2_with_runner, fair_esm_reference,
                      random_proteins, write_fasta)
from gpuengine import EmbeddingStore
from gpuengine.cli import app
from gpuengine.errors import ModelLoadError
from gpuengine.models.esm2_weights import build_esm2, read_fair_esm_checkpoint, read_hf_esm
from gpuengine.synthetic import write_hf_esm_with_transformers
from gpuengine.tokenization import EsmTokenizer
from gpuengine.store.schema import OutputSpec

SEQUENCES = random_proteins([1, 7, 60, 250], seed=13) + ["XBZUO" * 4]


def transformers_saved_random_model(directory, seed=0):
    """A small EsmModel with transformers' own random init, every weight then perturbed (so
    LayerNorm gamma/beta are not 1/0 and a swap would show), saved by save_pretrained."""
    from transformers import EsmConfig, EsmModel

    layers, dim, heads = TINY
    config = EsmConfig(vocab_size=33, hidden_size=dim, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=4 * dim,
                       position_embedding_type="rotary", token_dropout=True, pad_token_id=1,
                       mask_token_id=32, emb_layer_norm_before=False, layer_norm_eps=1e-5,
                       max_position_embeddings=1026, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = EsmModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * (0.3 if "LayerNorm" in name or "norm" in name
                                                  else 0.05))
    model.save_pretrained(directory)
    return model


def transformers_mean(model, sequences):
    tok = EsmTokenizer()
    out = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.from_numpy(tok.encode(seq)).long()[None]
            out.append(model(input_ids=ids).last_hidden_state[0, 1:-1].mean(0).numpy())
    return np.stack(out)


def test_save_pretrained_directory_embeds_like_transformers_forward(tmp_path):
    directory = tmp_path / "finetuned"
    model = transformers_saved_random_model(directory)
    import transformers

    keys = set(load_file(directory / "model.safetensors"))
    if int(transformers.__version__.split(".")[0]) >= 5:  # the layout of issue 13 point 11
        assert any(k.endswith("LayerNorm.gamma") for k in keys), sorted(keys)[:8]
        assert "encoder.layer.*.attention.self.rotary_embeddings.inv_freq" in keys
    fasta = write_fasta(tmp_path / "p.fasta", [(f"p{i}", s) for i, s in enumerate(SEQUENCES)])
    result = CliRunner().invoke(app, ["embed", str(fasta), "--model", str(directory), "--out",
                                      str(tmp_path / "s.lmdb"), "--gpus", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    with EmbeddingStore(tmp_path / "s.lmdb") as store:
        ours = store.get_many([f"p{i}" for i in range(len(SEQUENCES))])
    assert_close(ours, transformers_mean(model, SEQUENCES), "gpuengine vs transformers forward")


def test_save_pretrained_directory_equals_the_fair_esm_path(tmp_path, tiny_pt):
    """Same random weights (seed 3, as tiny_pt) saved by transformers: the state read through
    transformers equals the fair-esm checkpoint's, and the embeddings match fair-esm."""
    directory = write_hf_esm_with_transformers(tmp_path / "hf", *TINY, seed=3)
    cfg_hf, state_hf = read_hf_esm(directory)
    cfg_pt, state_pt, _ = read_fair_esm_checkpoint(tiny_pt)
    state_pt = {k: v for k, v in state_pt.items() if not k.startswith(("lm_head", "contact"))}
    assert cfg_hf == cfg_pt
    assert sorted(state_hf) == sorted(state_pt)
    for key, value in state_pt.items():
        assert torch.equal(state_hf[key], value), key  # inv_freq: the file's fp16-rounded values
    outputs = [OutputSpec(cfg_hf.num_layers, "mean"), OutputSpec(1, "per-token")]
    ours = embed_esm2_with_runner(build_esm2(cfg_hf, state_hf, torch.float32), SEQUENCES, outputs)
    ref = fair_esm_reference(tiny_pt, SEQUENCES, [1, cfg_hf.num_layers])
    assert_close(np.stack(ours[outputs[0]]), ref[cfg_hf.num_layers]["mean"], "HF (transformers) vs fair-esm")
    for a, b in zip(ours[outputs[1]], ref[1]["per-token"]):
        assert_close(a, b, "layer 1 per-token")


@pytest.mark.parametrize("model_class", ["EsmForMaskedLM", "EsmForSequenceClassification"])
def test_fine_tuning_heads_are_ignored(tmp_path, tiny_pt, model_class):
    """What users fine-tune and save: an ``esm.`` prefix and a head; the encoder reads the same."""
    directory = write_hf_esm_with_transformers(tmp_path / model_class, *TINY, seed=3,
                                               model_class=model_class)
    _, state_hf = read_hf_esm(directory)
    _, state_pt, _ = read_fair_esm_checkpoint(tiny_pt)
    assert all(torch.equal(state_hf[k], state_pt[k]) for k in state_hf)


def test_fp16_directory_is_read_in_fp16(tmp_path):
    """The files' own dtype ("auto"): no fp32 copy of an fp16 checkpoint is made."""
    directory = write_hf_esm_with_transformers(tmp_path / "half", *TINY, seed=3,
                                               dtype=torch.float16)
    _, state = read_hf_esm(directory)
    assert state["layers.0.fc1.weight"].dtype == torch.float16


def test_a_weight_missing_from_the_files_is_refused(tmp_path):
    """transformers would fill it with random values and only warn; we refuse, naming it."""
    directory = write_hf_esm_with_transformers(tmp_path / "hf", *TINY, seed=3)
    tensors = load_file(directory / "model.safetensors")
    victim = next(k for k in tensors if k.endswith("intermediate.dense.weight"))
    del tensors[victim]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing .*intermediate\.dense\.weight.*randomly"):
        read_hf_esm(directory)


def test_a_weight_of_the_wrong_shape_is_refused(tmp_path):
    directory = write_hf_esm_with_transformers(tmp_path / "hf", *TINY, seed=3)
    config = json.loads((directory / "config.json").read_text())
    config["hidden_size"], config["intermediate_size"] = 32, 128
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="transformers cannot load|do not match"):
        read_hf_esm(directory)
