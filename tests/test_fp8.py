"""``--precision fp8`` on the CPU: the eager FP8 path (the same arithmetic as the GPU's fused
kernels, tests/test_fp8_kernels.py) against fp32, weights quantized once, the fidelity guard in a
real engine run, the table's precision, and the errors on devices without FP8.

Fidelity thresholds are the measured values of these exact inputs (tiny random ESM-2, 2 layers,
d 64; stress: four LayerNorm gain channels x30) less about a tenth of what FP8 loses: a
regression in the quantization (a wrong scale, a re-quantization, fp8 silently running as fp16)
moves them by far more."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import random_proteins, write_fasta
from fp8_helpers import cpu_fp8_factory, needs_cpu_fp8, weights  # noqa: F401  (fixture)
from gpuengine.errors import EXIT_FIDELITY, DeviceError, UsageError
from gpuengine.models import fp8
from gpuengine.models.esm2_weights import build_esm2, read_fair_esm_checkpoint
from gpuengine.packing import WorkItem
from gpuengine.pooling import PoolingRule
from gpuengine.runner import DTYPES, Runner
from gpuengine.store.codec import sequence_digest
from gpuengine.store.schema import OutputSpec
from gpuengine.tokenization import EsmTokenizer



LENGTHS = [5, 23, 48, 50, 77, 120, 166, 210, 300, 33, 64, 90, 140, 250, 12, 49]
OUT = OutputSpec(2, "mean")
CPU = torch.device("cpu")


def items(seqs):
    tok = EsmTokenizer()
    return [WorkItem(sequence_digest(s), tok.encode(s, 1022), len(s)) for s in seqs]


def runner(path, precision, config=None):
    cfg, state, _ = read_fair_esm_checkpoint(path)
    return Runner(build_esm2(cfg, state, DTYPES[precision]), CPU, precision, [OUT],
                  PoolingRule(1, 1), fp8=config, fp8_on_cpu=True)


def embed(r, work):
    out = []
    for i in range(0, len(work), 8):
        result = r.embed(work[i:i + 8])
        assert result.finite.all()
        out.extend(result.vectors[OUT])
    return np.stack(out)


def cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def sample():
    return items(random_proteins(LENGTHS, seed=11))


@pytest.fixture(scope="module")
def fp32(weights, sample):
    return {kind: embed(runner(path, "fp32"), sample) for kind, path in weights.items()}


@needs_cpu_fp8
@pytest.mark.parametrize("kind, floor", [("plain", 0.9975), ("stress", 0.967)])
def test_fp8_against_fp32(weights, sample, fp32, kind, floor):
    """Measured min (mean) cosine to fp32: plain 0.99803 (0.99926), stress 0.97052 (0.99432);
    fp16 1.000000 / 0.999988, bf16 0.99998 / 0.99805. FP8 is lossy (below fp16 by orders of
    magnitude) but close on plain weights; outlier channels cost more, as on the real 3B shape
    (issue 17: 0.9957 plain, 0.911 stress). Floors: the measurement less ~10 % of the loss."""
    r = runner(weights[kind], "fp8", fp8.Fp8Config())  # all four GEMMs (the floors' measurement)
    assert r.kernels == "fp8-eager"
    cos = cosines(embed(r, sample), fp32[kind])
    fp16 = cosines(embed(runner(weights[kind], "fp16"), sample), fp32[kind])
    assert cos.min() >= floor, cos.min()
    assert cos.min() < fp16.min() - 1e-4, "fp8 must actually run in e4m3 (it is lossy)"


@needs_cpu_fp8
def test_a_wrong_scale_is_caught(weights, sample, fp32, monkeypatch):
    """The same measurement with each token's activation scale given to the next token (the
    weights quantized correctly): the cosine collapses far below the floor above, so that test
    fails on such a bug."""
    r = runner(weights["plain"], "fp8", fp8.Fp8Config())
    quantize = fp8.quantize_rows

    def shifted(x):
        q, s = quantize(x)
        return q, s.roll(1, 0)

    monkeypatch.setattr(fp8, "quantize_rows", shifted)
    cos = cosines(embed(r, sample), fp32["plain"])
    assert cos.min() < 0.99, cos.min()


@needs_cpu_fp8
def test_no_fp8_gemm_is_fp16(weights, sample, fp32):
    """With every GEMM in fp16 the FP8 layer is the fp16 layer (only the order of the last
    addition and the fp32 rounding of LayerNorm and GELU differ)."""
    fp16 = embed(runner(weights["plain"], "fp16"), sample)
    none = embed(runner(weights["plain"], "fp8", fp8.Fp8Config(frozenset())), sample)
    assert cosines(none, fp16).min() >= 0.999999
    assert np.abs(none - fp16).max() <= 2e-3


@needs_cpu_fp8
def test_weights_are_quantized_once(weights, sample, monkeypatch):
    """Quantized at load (the fp16 weights freed), never again: batches only quantize
    activations, and the e4m3 buffers stay the same tensors."""
    r = runner(weights["plain"], "fp8", fp8.Fp8Config())  # every GEMM quantized
    layer = r.model.layers[0]
    buffers = {name: getattr(layer, f"{name}_fp8") for name in fp8.GEMMS}
    pointers = {name: t.data_ptr() for name, t in buffers.items()}
    for name in fp8.GEMMS:
        assert buffers[name].dtype == torch.float8_e4m3fn
        assert getattr(layer, name).weight.numel() == 0, "the fp16 weight is freed"
        assert getattr(layer, f"{name}_fp8_scale").shape == (1, buffers[name].shape[0])
    calls = []
    quantize = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda x: calls.append(x) or quantize(x))
    embed(r, sample[:3])
    embed(r, sample[3:6])
    weight_shapes = {tuple(b.shape) for b in buffers.values()}
    assert calls and all(not isinstance(x, torch.nn.Parameter) for x in calls)
    tokens = {sum(i.n_tokens for i in sample[:3]), sum(i.n_tokens for i in sample[3:6])}
    assert {x.shape[0] for x in calls} <= tokens, "only activations (T rows) are quantized"
    assert not weight_shapes & {tuple(x.shape) for x in calls}
    for name in fp8.GEMMS:
        assert getattr(layer, f"{name}_fp8") is buffers[name]
        assert buffers[name].data_ptr() == pointers[name]
    with pytest.raises(UsageError, match="already quantized"):
        fp8.enable_fp8(r.model, CPU, allow_cpu=True)


@needs_cpu_fp8
def test_the_default_keeps_out_proj_in_fp16_and_loses_less(weights, sample, fp32):
    """The run default (DEFAULT_FP8, chosen from the H200 measurement in models/fp8.py): qkv,
    fc1 and fc2 in e4m3, out_proj's weight kept in fp16. Measured here, min cosine to fp32 of
    all four in FP8 against the default: plain 0.99803 / 0.99877, stress 0.97052 / 0.97986 —
    the default loses less on both, as on the 3B shape (0.99613 / 0.99755, 0.98287 /
    0.98959), and still runs in e4m3 (far below fp16)."""
    assert fp8.DEFAULT_FP8.describe() == "qkv,fc1,fc2"
    for kind in ("plain", "stress"):
        default = runner(weights[kind], "fp8")
        layer = default.model.layers[0]
        assert layer.out_proj.weight.dtype == torch.float16 and layer.out_proj.weight.numel()
        assert layer.fc2.weight.numel() == 0, "fc2 runs in e4m3"
        cos_default = cosines(embed(default, sample), fp32[kind]).min()
        cos_all = cosines(embed(runner(weights[kind], "fp8", fp8.Fp8Config()), sample),
                          fp32[kind]).min()
        fp16 = cosines(embed(runner(weights[kind], "fp16"), sample), fp32[kind]).min()
        assert cos_all < cos_default < fp16 - 1e-4, (kind, cos_all, cos_default, fp16)


def test_fp8_config_parsing():
    assert fp8.Fp8Config.parse("all").gemms == frozenset(fp8.GEMMS)
    assert fp8.Fp8Config.parse("qkv, fc1").describe() == "qkv,fc1"
    assert fp8.Fp8Config.parse("none").describe() == "none"
    with pytest.raises(UsageError, match="fc3"):
        fp8.Fp8Config.parse("fc3")


# -- devices -------------------------------------------------------------------------------------

def test_fp8_needs_a_capable_gpu(monkeypatch):
    assert "not a GPU" in fp8.fp8_unsupported_reason(CPU)
    with pytest.raises(DeviceError, match="compute capability 8.9"):
        fp8.require_fp8_device(CPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    reason = fp8.fp8_unsupported_reason(torch.device("cuda", 0))
    assert "A100" in reason and "8.0" in reason and "8.9" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.fp8_unsupported_reason(torch.device("cuda", 0)) is None


def test_fp8_on_the_cpu_is_refused_by_embed(weights, tmp_path):
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed

    fasta = write_fasta(tmp_path / "p.fa", [("a", "MKV"), ("b", "LLAG")])
    config = EmbedConfig(inputs=(fasta,), model=str(weights["plain"]), out=tmp_path / "s.lmdb",
                         precision="fp8", devices="cpu")
    with pytest.raises(DeviceError, match="not a GPU.*--precision fp16"):
        run_embed(config)
    assert not (tmp_path / "s.lmdb").exists(), "nothing was created"


def test_fp8_is_for_esm2_only(tmp_path):
    from gpuengine.synthetic import write_dnabert_s

    with pytest.raises(UsageError, match="ESM-2 only"):
        fp8.check_fp8_run("dnabert-s", [CPU])
    dna = write_dnabert_s(tmp_path / "dna", num_layers=1, embed_dim=32, heads=2, intermediate=64)
    from gpuengine.models.registry import family
    from gpuengine.models.sources import resolve

    source = resolve(str(dna), allow_download=False)
    model = family(source.family).build(family(source.family).read(source), torch.float16)
    with pytest.raises(UsageError, match="ESM-2 only"):
        Runner(model, CPU, "fp8", [OutputSpec(1, "mean")], PoolingRule(0, 0), fp8_on_cpu=True)


# -- the fidelity guard in a real run -----------------------------------------------------------

def embed_config(path, fasta, out, **kw):
    from gpuengine.config import EmbedConfig

    return EmbedConfig(inputs=(fasta,), model=str(path), out=out, devices="cpu",
                       precision="fp8", max_tokens=512, **kw)


@pytest.fixture(scope="module")
def proteins(tmp_path_factory):
    seqs = random_proteins([30 + 7 * i for i in range(40)], seed=5)
    return write_fasta(tmp_path_factory.mktemp("in") / "p.fa",
                       [(f"p{i}", s) for i, s in enumerate(seqs)])


@needs_cpu_fp8
def test_guard_passes_and_is_recorded(weights, proteins, tmp_path):
    from gpuengine.engine import run_embed
    from gpuengine.store.reader import EmbeddingStore

    out = tmp_path / "s.lmdb"
    summary = run_embed(embed_config(weights["plain"], proteins, out),
                        runner_factory=cpu_fp8_factory(weights["plain"]))
    assert summary.exit_code == 0 and summary.embedded == 40
    fid = summary.fidelity
    assert fid["precision"] == "fp8" and fid["reference"] == "fp16" and fid["passed"]
    assert fid["sequences"] == 40 and 0.998 <= fid["min_cosine"] < 0.99999, fid  # 0.99925
    assert fid["min_cosine"] <= fid["mean_cosine"]
    with EmbeddingStore(out) as store:
        assert store.spec.precision == "fp8", "fp8 is the table's own precision"
        runs = [r for r in store.runs().values() if r.get("info", {}).get("command") == "embed"]
    assert [r["info"]["fidelity"]["min_cosine"] for r in runs] == [fid["min_cosine"]]
    assert runs[0]["info"]["precision"] == "fp8"


@needs_cpu_fp8
def test_guard_refuses_below_the_threshold(weights, proteins, tmp_path):
    """fp8 against fp16 on this input (measured min cosine with the default GEMMs: plain
    0.99925, stress 0.99128; all four in FP8: 0.99922, 0.99083):
    with --fp8-min-cosine 0.995 the stress weights are refused before anything is written,
    exit code 4, naming the measurement; the plain weights pass the same threshold."""
    from gpuengine.engine import run_embed
    from gpuengine.fidelity import FidelityError

    out = tmp_path / "s.lmdb"
    with pytest.raises(FidelityError) as caught:
        run_embed(embed_config(weights["stress"], proteins, out, fp8_min_cosine=0.995),
                  runner_factory=cpu_fp8_factory(weights["stress"]))
    assert caught.value.exit_code == EXIT_FIDELITY == 4
    text = str(caught.value)
    assert "min cosine 0.99" in text and "threshold 0.995" in text and "Nothing was written" in text
    assert "lowest for record 'p" in text
    assert not out.exists()
    summary = run_embed(embed_config(weights["plain"], proteins, out, fp8_min_cosine=0.995),
                        runner_factory=cpu_fp8_factory(weights["plain"]))
    assert summary.fidelity["min_cosine"] >= 0.995 and summary.embedded == 40


@needs_cpu_fp8
def test_a_table_holds_one_precision_fp8_included(weights, proteins, tmp_path):
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed
    from gpuengine.errors import StoreMismatchError

    out = tmp_path / "s.lmdb"
    run_embed(embed_config(weights["plain"], proteins, out),
              runner_factory=cpu_fp8_factory(weights["plain"]))
    fp32 = EmbedConfig(inputs=(proteins,), model=str(weights["plain"]), out=out, devices="cpu")
    with pytest.raises(StoreMismatchError, match="fp8"):
        run_embed(fp32)
