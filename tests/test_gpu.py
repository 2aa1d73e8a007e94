"""GPU tests (``pytest -m gpu``; run on the device machine by tools/device_check.sh).

Half precision is compared with fp32 by cosine; fp32 on the GPU is compared with fair-esm's
own forward on the GPU with the CPU tolerance (TF32 stays off)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import fair_esm_model, random_proteins
from gpuengine.models.attention import PaddedAttention, VarlenAttention, varlen_available
from gpuengine.models.esm2_weights import build_esm2, read_fair_esm_checkpoint
from gpuengine.packing import WorkItem
from gpuengine.pooling import PoolingRule
from gpuengine.runner import Runner
from gpuengine.store.codec import sequence_digest
from gpuengine.store.schema import OutputSpec
from gpuengine.synthetic import write_fair_esm_checkpoint
from gpuengine.tokenization import EsmTokenizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LENGTHS = [1, 7, 50, 166, 300, 700, 1022, 1100]


@pytest.fixture(scope="module")
def gpu_pt(tmp_path_factory):
    return write_fair_esm_checkpoint(tmp_path_factory.mktemp("w") / "esm2_t4_gpu.pt", 4, 128, 4, seed=5)


def embed(path, precision, seqs, attention=None, layer=4):
    cfg, state, _ = read_fair_esm_checkpoint(path)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    runner = Runner(build_esm2(cfg, state, dtype), torch.device("cuda"), precision,
                    [OutputSpec(layer, "mean")], PoolingRule(1, 1))
    if attention is not None:
        runner.attention, runner.padded = attention, attention.needs_padding
    tok = EsmTokenizer()
    items = [WorkItem(sequence_digest(s), tok.encode(s, 1022), min(len(s), 1022)) for s in seqs]
    out = runner.embed(items)
    assert out.finite.all()
    return np.stack(out.vectors[OutputSpec(layer, "mean")])


def cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_fp32_on_gpu_matches_fair_esm(gpu_pt):
    seqs = random_proteins(LENGTHS, seed=1)
    model, alphabet = fair_esm_model(gpu_pt)
    model = model.cuda()
    _, _, toks = alphabet.get_batch_converter(1022)([(str(i), s) for i, s in enumerate(seqs)])
    with torch.no_grad():
        rep = model(toks.cuda(), repr_layers=[4])["representations"][4]
    ref = np.stack([rep[i, 1:min(len(s), 1022) + 1].mean(0).cpu().numpy() for i, s in enumerate(seqs)])
    ours = embed(gpu_pt, "fp32", seqs)
    assert np.abs(ours - ref).max() <= 1e-5, (ours[0, :5], ref[0, :5])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_cosine_against_fp32(gpu_pt, precision):
    seqs = random_proteins(LENGTHS, seed=2)
    cos = cosines(embed(gpu_pt, precision, seqs), embed(gpu_pt, "fp32", seqs))
    assert cos.min() >= 0.9999, cos


@pytest.mark.skipif(not varlen_available(), reason="torch.nn.attention.varlen needs torch >= 2.10")
def test_varlen_kernel_matches_padded_attention_in_fp16(gpu_pt):
    seqs = random_proteins(LENGTHS, seed=3)
    a = embed(gpu_pt, "fp16", seqs, attention=VarlenAttention())
    b = embed(gpu_pt, "fp16", seqs, attention=PaddedAttention())
    assert cosines(a, b).min() >= 0.99999
