"""Packed ESM-2 against fair-esm's own ``ESM2.forward`` on random-weight checkpoints, fp32, CPU.

Tolerance: max |ours − fair-esm| ≤ 1e-5 on every value. On failure the first values of both
sides are printed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_close, embed_esm2_with_runner, fair_esm_reference, random_proteins
from gpuengine.models.esm2_weights import build_esm2, read_fair_esm_checkpoint, read_hf_esm
from gpuengine.store.schema import OutputSpec
from gpuengine.synthetic import write_fair_esm_checkpoint

LENGTHS = [1, 2, 3, 5, 17, 64, 129, 300, 1021, 1022, 1023, 1100]
POOLS = ("mean", "bos", "per-token")


@pytest.mark.parametrize("shape", [pytest.param((2, 64, 4), marks=pytest.mark.slow), (3, 48, 2),
                                   (1, 32, 2)],
                         ids=["d64-h4-hd16", "d48-h2-hd24", "d32-h2-hd16-1layer"])
def test_packed_matches_fair_esm(tmp_path, shape):
    layers_n = shape[0]
    path = write_fair_esm_checkpoint(tmp_path / f"esm2_t{layers_n}_test.pt", *shape, seed=11)
    sequences = random_proteins(LENGTHS, seed=shape[1])
    sequences.append("XBZUO" * 7)  # the rare residues
    layers = sorted({0, 1, layers_n})
    ref = fair_esm_reference(path, sequences, layers)
    cfg, state, synthetic = read_fair_esm_checkpoint(path)
    assert synthetic
    model = build_esm2(cfg, state, torch.float32)
    outputs = [OutputSpec(layer, pool) for layer in layers for pool in POOLS]
    ours = embed_esm2_with_runner(model, sequences, outputs)
    for o in outputs:
        if o.pool == "per-token":
            for i, (a, b) in enumerate(zip(ours[o], ref[o.layer]["per-token"])):
                assert a.shape == b.shape
                assert_close(a, b, f"{o.label} seq {i} (len {len(sequences[i])})")
        else:
            assert_close(np.stack(ours[o]), ref[o.layer][o.pool], o.label)


def test_hf_directory_gives_the_same_embeddings(tiny_pt, tiny_hf):
    sequences = random_proteins([5, 80, 400], seed=1)
    cfg_a, state_a, _ = read_fair_esm_checkpoint(tiny_pt)
    cfg_b, state_b = read_hf_esm(tiny_hf)
    assert cfg_a == cfg_b
    outputs = [OutputSpec(cfg_a.num_layers, "mean")]
    a = embed_esm2_with_runner(build_esm2(cfg_a, state_a, torch.float32), sequences, outputs)
    b = embed_esm2_with_runner(build_esm2(cfg_b, state_b, torch.float32), sequences, outputs)
    ref = fair_esm_reference(tiny_pt, sequences, [cfg_a.num_layers])
    assert_close(np.stack(b[outputs[0]]), ref[cfg_a.num_layers]["mean"], "HF dir vs fair-esm")
    assert_close(np.stack(a[outputs[0]]), np.stack(b[outputs[0]]), "pt vs HF dir")


def test_hf_directory_loads_in_transformers(tiny_pt, tiny_hf):
    """The HF writer's directory is a real EsmModel: transformers' own forward agrees with fair-esm."""
    from transformers import EsmModel

    seq = random_proteins([50], seed=5)[0]
    model = EsmModel.from_pretrained(tiny_hf, add_pooling_layer=False).eval()
    from gpuengine.tokenization import EsmTokenizer

    ids = torch.from_numpy(EsmTokenizer().encode(seq)).long()[None]
    with torch.no_grad():
        hf = model(input_ids=ids).last_hidden_state[0, 1:-1].mean(0).numpy()
    ref = fair_esm_reference(tiny_pt, [seq], [2])[2]["mean"][0]
    assert_close(hf, ref, "transformers EsmModel vs fair-esm")


def test_checkpoint_inv_freq_is_the_fp16_rounded_one(tiny_pt):
    """The trap is armed: recomputing inv_freq in fp32 would not match the stored buffer."""
    _, state, _ = read_fair_esm_checkpoint(tiny_pt)
    stored = state["layers.0.self_attn.rot_emb.inv_freq"]
    fresh = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    assert not torch.equal(stored.float(), fresh)


def test_batch_composition_does_not_change_results(tiny_pt):
    """A sequence embedded alone equals the same sequence packed with others."""
    cfg, state, _ = read_fair_esm_checkpoint(tiny_pt)
    model = build_esm2(cfg, state, torch.float32)
    seqs = random_proteins([10, 200, 33, 700], seed=9)
    out = [OutputSpec(2, "mean")]
    packed = np.stack(embed_esm2_with_runner(model, seqs, out)[out[0]])
    alone = np.stack([embed_esm2_with_runner(model, [s], out)[out[0]][0] for s in seqs])
    assert_close(packed, alone, "packed vs alone")


def test_intermediate_layer_stops_early_and_is_not_normalised(tiny_pt):
    cfg, state, _ = read_fair_esm_checkpoint(tiny_pt)
    seq = random_proteins([40], seed=2)
    ref = fair_esm_reference(tiny_pt, seq, [1, 2])
    ours = embed_esm2_with_runner(build_esm2(cfg, state, torch.float32), seq,
                             [OutputSpec(1, "mean"), OutputSpec(2, "mean")])
    assert_close(ours[OutputSpec(1, "mean")][0], ref[1]["mean"][0], "layer 1")
    assert not np.allclose(ref[1]["mean"][0], ref[2]["mean"][0])
