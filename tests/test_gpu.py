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


def embed(path, precision, seqs, attention=None, layer=4, kernels=None):
    cfg, state, _ = read_fair_esm_checkpoint(path)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    runner = Runner(build_esm2(cfg, state, dtype), torch.device("cuda"), precision,
                    [OutputSpec(layer, "mean")], PoolingRule(1, 1), compile=kernels is not None,
                    kernels=kernels)
    assert runner.kernels == (kernels or "eager")
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


@pytest.mark.skipif(not varlen_available(), reason="torch.nn.attention.varlen needs torch >= 2.10")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("kernels", ["compiled", "fused-rope", "triton", "triton-fused-fc1"])
def test_fast_layer_kernels_match_the_eager_layer(gpu_pt, kernels, precision):
    """torch.compile'd and Triton layers meet the fp32 bar (cosine ≥ 0.9999) and stay within
    twice the eager half-precision layer's distance from fp32 (they round at other points, so
    the distances differ by rounding noise; a wrong rotation or residual would be far off)."""
    seqs = random_proteins(LENGTHS + [2, 3, 64, 65, 129], seed=6)
    reference = embed(gpu_pt, "fp32", seqs)
    fast = cosines(embed(gpu_pt, precision, seqs, kernels=kernels), reference).min()
    eager = cosines(embed(gpu_pt, precision, seqs), reference).min()
    assert fast >= 0.9999 and 1 - fast <= 2 * (1 - eager), (fast, eager)


@pytest.mark.skipif(not varlen_available(), reason="torch.nn.attention.varlen needs torch >= 2.10")
@pytest.mark.parametrize("kernels", ["triton", None])
def test_flex_attention_matches_varlen_in_fp16(gpu_pt, kernels):
    """ESM-2 with compiled FlexAttention (document mask, 64-row blocks; q/k/v projected into the
    row bucket by the Triton kinds) against FlashAttention-2 varlen: cosine ≥ 0.99999."""
    from gpuengine.models.flex import FlexDocumentAttention, LengthSwitchedAttention

    seqs = random_proteins(LENGTHS + [2, 3, 64, 65, 129], seed=7)
    flex = LengthSwitchedAttention(VarlenAttention(), FlexDocumentAttention(), flex_max_len=1 << 20)
    a = embed(gpu_pt, "fp16", seqs, attention=flex, kernels=kernels)
    b = embed(gpu_pt, "fp16", seqs, attention=VarlenAttention(), kernels=kernels)
    assert cosines(a, b).min() >= 0.99999


def _store_vectors(path):
    from gpuengine.store.reader import EmbeddingStore

    with EmbeddingStore(path) as store:
        return dict(store.items())


def _embed_run(gpu_pt, tmp_path, name, devices, runner_factory=None, **options):
    from conftest import write_fasta
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed

    seqs = random_proteins([30 + (i * 37) % 900 for i in range(300)], seed=4)
    fasta = write_fasta(tmp_path / "in.fa", [(f"s{i}", s) for i, s in enumerate(seqs)])
    config = EmbedConfig(inputs=(fasta,), model=str(gpu_pt), out=tmp_path / name, devices=devices,
                         **options)
    summary = run_embed(config, runner_factory=runner_factory)
    return summary, _store_vectors(tmp_path / name)


def test_engine_on_gpu_matches_the_cpu_run(gpu_pt, tmp_path):
    """The full pipeline (prefetch thread, copy and compute streams, telemetry) at fp16 against
    the CPU fp32 run: same ids, cosine >= 0.9999."""
    gpu_summary, gpu = _embed_run(gpu_pt, tmp_path, "gpu.lmdb", "0", max_tokens=4096)
    _, cpu = _embed_run(gpu_pt, tmp_path, "cpu.lmdb", "cpu")
    assert gpu_summary.exit_code == 0 and set(gpu) == set(cpu) and len(gpu) == 300
    a = np.stack([gpu[k] for k in sorted(gpu)])
    b = np.stack([cpu[k] for k in sorted(cpu)])
    assert cosines(a, b).min() >= 0.9999


def test_one_stream_pipeline_equals_the_two_stream_pipeline(gpu_pt, tmp_path):
    """Staging on the copy stream and computing on the compute stream gives the same vectors as
    running every step on one stream synchronously."""
    seqs = random_proteins(LENGTHS * 4, seed=6)
    cfg, state, _ = read_fair_esm_checkpoint(gpu_pt)
    runner = Runner(build_esm2(cfg, state, torch.float16), torch.device("cuda"), "fp16",
                    [OutputSpec(4, "mean")], PoolingRule(1, 1))
    tok = EsmTokenizer()
    items = [WorkItem(sequence_digest(s), tok.encode(s, 1022), min(len(s), 1022)) for s in seqs]
    batches = [items[i:i + 8] for i in range(0, len(items), 8)]
    launched = [runner.launch(runner.stage(b)) for b in batches]  # all in flight at once
    two = np.concatenate([np.stack(runner.finish(x).vectors[OutputSpec(4, "mean")]) for x in launched])
    runner.copy_stream = runner.compute_stream = torch.cuda.current_stream()
    one = np.concatenate([np.stack(runner.embed(b).vectors[OutputSpec(4, "mean")]) for b in batches])
    assert cosines(two, one).min() >= 0.99999


def test_injected_out_of_memory_recovers(gpu_pt, tmp_path):
    """The first three launches above 1000 tokens raise CUDA OOM: the scheduler splits, the
    budget drops, and every record is still committed exactly once."""
    from gpuengine.models.registry import family

    state = {"ooms": 0}

    def factory(device, precision, outputs):
        from gpuengine.models.esm2_weights import build_esm2 as build

        cfg, st, _ = read_fair_esm_checkpoint(gpu_pt)
        runner = Runner(build(cfg, st, torch.float16), device, precision, outputs,
                        family("esm2").pooling_rule)
        real = runner.launch

        def launch(staged):
            warm_up = staged.items[0].digest == bytes(16)  # Runner.synthetic_items
            if not warm_up and staged.total > 1000 and state["ooms"] < 3:
                state["ooms"] += 1
                raise torch.cuda.OutOfMemoryError("injected")
            return real(staged)

        runner.launch = launch
        return runner

    summary, vectors = _embed_run(gpu_pt, tmp_path, "oom.lmdb", "0", runner_factory=factory,
                                  max_tokens=8192, precision="fp16")
    assert state["ooms"] == 3 and summary.exit_code == 0 and len(vectors) == 300
    assert sum(d["oom_events"] for d in summary.devices) == 3
