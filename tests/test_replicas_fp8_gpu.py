"""``--precision fp8 --replicas-per-gpu 2`` on a real GPU (``pytest -m gpu``; compute
capability >= 8.9): the two replicas of GPU 0 run one model whose weights were quantized once
(the fused Triton kernels), store what one replica stores, and the fidelity guard measures the
first replica once, as with one. The CPU's eager path of the same is in test_replicas_fp8.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_proteins, write_fasta
from gpuengine.synthetic import write_fair_esm_checkpoint


def _fp8_gpu() -> bool:
    from gpuengine.models.fp8 import fp8_unsupported_reason

    return torch.cuda.is_available() and fp8_unsupported_reason(torch.device("cuda")) is None


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _fp8_gpu(), reason="needs a GPU of compute capability >= 8.9")]

LAYERS = 4


def _run(checkpoint, fasta, out, replicas):
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed
    from gpuengine.store.reader import EmbeddingStore

    summary = run_embed(EmbedConfig(inputs=(fasta,), model=str(checkpoint), out=out,
                                    precision="fp8", devices="0", max_tokens=4096,
                                    replicas_per_gpu=replicas))
    with EmbeddingStore(out) as store:
        return summary, dict(store.items())


def test_two_fp8_replicas_on_one_gpu_quantize_once_and_store_what_one_stores(tmp_path,
                                                                            monkeypatch):
    from gpuengine.models import fp8

    checkpoint = write_fair_esm_checkpoint(tmp_path / "esm2_t4_fp8rep.pt", LAYERS, 128, 4,
                                           seed=5)
    seqs = random_proteins([30 + (i * 37) % 900 for i in range(300)], seed=4)
    fasta = write_fasta(tmp_path / "in.fa", [(f"s{i}", s) for i, s in enumerate(seqs)])
    quantized = []
    real = fp8._quantize_layer
    monkeypatch.setattr(fp8, "_quantize_layer",
                        lambda layer, layout: quantized.append(layer) or real(layer, layout))
    one, a = _run(checkpoint, fasta, tmp_path / "one.lmdb", 1)
    assert len(quantized) == LAYERS
    quantized.clear()
    two, b = _run(checkpoint, fasta, tmp_path / "two.lmdb", 2)
    assert len(quantized) == LAYERS, "the two replicas' one model, quantized once"
    assert one.exit_code == two.exit_code == 0 and sorted(a) == sorted(b) and len(b) == 300
    keys = sorted(a)
    x, y = np.stack([a[k] for k in keys]), np.stack([b[k] for k in keys])
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    assert cos.min() >= 0.9999, cos.min()  # the same quantized weights; batches packed apart
    assert [d["device"] for d in two.devices] == ["cuda:0#0", "cuda:0#1"]
    assert all(d["batches"] > 0 for d in two.devices), two.devices
    assert two.fidelity["passed"] and two.fidelity["sequences"] == one.fidelity["sequences"]
    assert two.fidelity["min_cosine"] == pytest.approx(one.fidelity["min_cosine"], abs=1e-4)
