"""FP8 on a GPU (``pytest -m gpu``; compute capability >= 8.9, run on the device machine).

The fused Triton quantization kernels against the eager quantization on the same device (the
hardware's fp32 → e4m3 conversion against torch's), the FP8 forward with the fused kernels
against fp32 and against the eager FP8 layers, and an engine run with the fidelity guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import random_proteins, write_fasta
from gpuengine.models.esm2_weights import build_esm2, read_fair_esm_checkpoint
from gpuengine.models.fp8 import Fp8Config, fp8_unsupported_reason, gelu_erf, quantize_rows
from gpuengine.packing import WorkItem
from gpuengine.pooling import PoolingRule
from gpuengine.runner import DTYPES, Runner
from gpuengine.store.codec import sequence_digest
from gpuengine.store.schema import OutputSpec
from gpuengine.synthetic import write_fair_esm_checkpoint
from gpuengine.tokenization import EsmTokenizer


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and fp8_unsupported_reason(torch.device("cuda")) is None


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _fp8_gpu(), reason="needs a GPU of compute capability >= 8.9")]

LENGTHS = [1, 7, 50, 166, 300, 700, 1022, 1100]
CUDA = torch.device("cuda")


def ordered(q):
    code = q.view(torch.uint8).int()
    return torch.where(code >= 128, -(code - 128), code)


def assert_quantized_like(got, want, what, exact):
    (gq, gs), (wq, ws) = got, want
    steps = (ordered(gq) - ordered(wq)).abs()
    if exact:
        assert torch.equal(gs, ws), what
        assert int(steps.max()) == 0, (what, int((steps > 0).sum()))
        return
    # LayerNorm's and erf's fp32 rounding may differ from torch's by an ulp: a value on an
    # e4m3 rounding boundary then moves by one step
    assert torch.allclose(gs, ws, rtol=1e-6, atol=0), (what, float((gs / ws - 1).abs().max()))
    assert int(steps.max()) <= 1, (what, int(steps.max()))
    assert float((steps > 0).float().mean()) <= 1e-3, (what, float((steps > 0).float().mean()))


@pytest.mark.parametrize("rows, cols", [(4099, 2560), (1000, 10240), (37, 128)])
def test_fused_quantization_equals_eager_on_gpu(rows, cols):
    from gpuengine.models import fp8_triton as fq

    torch.manual_seed(0)
    x = (torch.randn(rows, cols, device=CUDA) * 2).half()
    x[::97, 3] = 40.0  # outlier channels set some rows' scales
    assert_quantized_like(fq.quantize_rows(x), quantize_rows(x), "rows", exact=True)
    assert_quantized_like(fq.gelu_quant(x), quantize_rows(gelu_erf(x.float())), "gelu", False)
    w = (1 + 0.1 * torch.randn(cols, device=CUDA)).half()
    b = (0.1 * torch.randn(cols, device=CUDA)).half()
    ln = F.layer_norm(x.float(), (cols,), w.float(), b.float(), 1e-5)
    assert_quantized_like(fq.layer_norm_quant(x, w, b, 1e-5), quantize_rows(ln), "ln", False)
    y = torch.randn_like(x)
    res, q, s = fq.add_layer_norm_quant(x, y, w, b, 1e-5)
    assert torch.equal(res, x + y)
    ln = F.layer_norm((x + y).float(), (cols,), w.float(), b.float(), 1e-5)
    assert_quantized_like((q, s), quantize_rows(ln), "add_ln", False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("w")
    return {kind: write_fair_esm_checkpoint(root / f"esm2_t4_{kind}.pt", 4, 128, 4, seed=5,
                                            stress=kind == "stress")
            for kind in ("plain", "stress")}


def embed(path, precision, seqs, compile=True, fp8=None):
    cfg, state, _ = read_fair_esm_checkpoint(path)
    out = OutputSpec(4, "mean")
    runner = Runner(build_esm2(cfg, state, DTYPES[precision]), CUDA, precision, [out],
                    PoolingRule(1, 1), compile=compile and precision != "fp32", fp8=fp8)
    tok = EsmTokenizer()
    items = [WorkItem(sequence_digest(s), tok.encode(s, 1022), min(len(s), 1022)) for s in seqs]
    result = runner.embed(items)
    assert result.finite.all()
    return runner.kernels, np.stack(result.vectors[out])


def cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_fp8_forward_against_fp32_on_gpu(checkpoints):
    """The CPU eager path measured min cosine 0.99658 (plain) / 0.90792 (stress) on these
    weights and sequences; the GPU's fused kernels and FlashAttention may move that by a
    fraction of FP8's own loss (test_fp8_kernels.py), and stay well apart from fp16."""
    seqs = random_proteins(LENGTHS, seed=2)
    for kind, floor in (("plain", 0.995), ("stress", 0.88)):
        _, ref = embed(checkpoints[kind], "fp32", seqs)
        kernels, fused = embed(checkpoints[kind], "fp8", seqs)
        assert kernels == "fp8-triton"
        eager_kind, eager = embed(checkpoints[kind], "fp8", seqs, compile=False)
        assert eager_kind == "fp8-eager"
        cos, cos_eager = cosines(fused, ref), cosines(eager, ref)
        print(kind, "fp8-triton", cos.min(), "fp8-eager", cos_eager.min())
        assert cos.min() >= floor and cos_eager.min() >= floor, (kind, cos.min(), cos_eager.min())
        lost = 1 - cos_eager.min()
        assert 1 - cosines(fused, eager).min() <= 0.35 * lost, kind


@pytest.mark.parametrize("gemms", ["qkv,fc1", "out_proj,fc2", "none"])
def test_fp8_gemm_choices_on_gpu(checkpoints, gemms):
    seqs = random_proteins(LENGTHS, seed=3)
    _, ref = embed(checkpoints["plain"], "fp32", seqs)
    _, fp16 = embed(checkpoints["plain"], "fp16", seqs)
    _, mixed = embed(checkpoints["plain"], "fp8", seqs, fp8=Fp8Config.parse(gemms))
    cos = cosines(mixed, ref)
    assert cos.min() >= 0.995, (gemms, cos.min())
    if gemms == "none":
        assert cosines(mixed, fp16).min() >= 0.99999


def test_fp8_engine_run_on_gpu(checkpoints, tmp_path):
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed
    from gpuengine.store.reader import EmbeddingStore

    seqs = random_proteins([30 + 13 * i for i in range(300)], seed=4)
    fasta = write_fasta(tmp_path / "p.fa", [(f"p{i}", s) for i, s in enumerate(seqs)])
    out = tmp_path / "s.lmdb"
    summary = run_embed(EmbedConfig(inputs=(fasta,), model=str(checkpoints["plain"]), out=out,
                                    precision="fp8", devices="0", layers=(4,)))
    assert summary.exit_code == 0 and summary.embedded == 300
    assert summary.fidelity["passed"] and summary.fidelity["sequences"] == 256
    print("guard", summary.fidelity)
    with EmbeddingStore(out) as store:
        assert store.spec.precision == "fp8"


def test_check_on_gpu_includes_fp8(checkpoints, tmp_path):
    from gpuengine.check import CheckConfig, format_report, run_check

    seqs = random_proteins([40 + 11 * i for i in range(64)], seed=6)
    fasta = write_fasta(tmp_path / "p.fa", [(f"p{i}", s) for i, s in enumerate(seqs)])
    report = run_check(CheckConfig(inputs=(fasta,), model=str(checkpoints["plain"]),
                                   devices="0", sample=64))
    print(format_report(report))
    assert [r.precision for r in report.results] == ["fp16", "bf16", "fp8"]
    fp16, bf16, f8 = report.results
    assert f8.kernels == "fp8-triton" and fp16.min_cosine > bf16.min_cosine > f8.min_cosine


def test_embed_cli_fp8_end_to_end_on_gpu(checkpoints, tmp_path):
    """``gpuengine embed --precision fp8`` as a user runs it (a child process, FASTA → LMDB):
    exit 0, the guard's measurement in the JSON summary, the summary table and the run record;
    a rerun computes nothing; a threshold above the measured cosine refuses with exit code 4
    and leaves the store as it was."""
    import json
    import subprocess
    import sys

    from gpuengine.store.reader import EmbeddingStore

    seqs = random_proteins([20 + 7 * i for i in range(400)], seed=7)
    fasta = write_fasta(tmp_path / "p.fa", [(f"p{i}", s) for i, s in enumerate(seqs)])
    out = tmp_path / "s.lmdb"

    def embed_cli(*extra):
        return subprocess.run([sys.executable, "-m", "gpuengine", "embed", str(fasta), "--model",
                               str(checkpoints["plain"]), "--out", str(out), "--precision",
                               "fp8", "--gpus", "0", "--json", *extra],
                              capture_output=True, text=True, timeout=300)

    done = embed_cli()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    summary = json.loads(done.stdout)
    fid = summary["fidelity"]
    assert summary["embedded"] == 400 and fid["passed"] and fid["sequences"] == 256, fid
    assert 0.99 <= fid["min_cosine"] < 0.99999, fid
    assert "fp8 fidelity" in done.stderr + done.stdout
    with EmbeddingStore(out) as store:
        assert store.spec.precision == "fp8" and len(store) == 400
        runs = [r for r in store.runs().values() if r.get("info", {}).get("command") == "embed"]
        assert runs[-1]["info"]["fidelity"]["min_cosine"] == fid["min_cosine"]
    again = embed_cli()
    assert again.returncode == 0 and json.loads(again.stdout)["embedded"] == 0, again.stderr[-2000:]
    refused = embed_cli("--fp8-min-cosine", "0.999999")
    assert refused.returncode == 4 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    with EmbeddingStore(out) as store:
        assert len(store) == 400
