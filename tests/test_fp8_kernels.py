"""The fused FP8 quantization kernels (models/fp8_triton.py) against the eager quantization they
replace, and a whole FP8 layer stack with them against the eager FP8 layers, in Triton's CPU
interpreter.

Runs where Triton is installed (CUDA builds of torch bring it; CI's CPU torch does not, so it
is skipped there). Triton 3.6's interpreter rounds fp32 → e4m3 wrongly when the rounding
carries into the exponent (31.5 → 16 instead of 32), so the expected codes here are the eager
fp32 values converted by the interpreter's own conversion: these tests check everything before
the conversion; ``tests/test_gpu.py`` checks the kernels on the GPU, where the conversion is the
hardware's, against torch's conversion."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest

from fp8_helpers import run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed")

FIX_INTERPRETER = textwrap.dedent("""
    import numpy as np
    import torch
    import triton.language as tl
    import triton.runtime.interpreter as _interp

    _convert_float = _interp._convert_float

    def _rtne_e4m3(data, src, dst, rounding_mode):  # torch's conversion for fp32 -> e4m3
        if src == tl.float32 and dst == tl.float8e4nv:
            values = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
            return values.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(data.shape)
        return _convert_float(data, src, dst, rounding_mode)

    _interp._convert_float = _rtne_e4m3
""")

PRELUDE = FIX_INTERPRETER + textwrap.dedent("""
    import torch.nn.functional as F
    from gpuengine.models import fp8_triton as fq
    from gpuengine.models.fp8 import gelu_erf, quantize_rows

    def expected(v):
        return quantize_rows(v.float())

    def ordered(q):
        code = q.view(torch.uint8).int()
        return torch.where(code >= 128, -(code - 128), code)

    def same(got, want, what, exact=False, max_fraction=0.0):
        (gq, gs), (wq, ws) = got, want
        assert gq.dtype == torch.float8_e4m3fn and gs.shape == (gq.shape[0], 1), what
        steps = (ordered(gq) - ordered(wq)).abs()
        if exact:
            assert torch.equal(gs, ws), (what, (gs - ws).abs().max())
            assert int(steps.max()) == 0, (what, int((steps > 0).sum()))
        else:  # LayerNorm / erf rounding may differ from torch's by an fp32 ulp
            assert torch.allclose(gs, ws, rtol=1e-6, atol=0), (what, (gs / ws - 1).abs().max())
            assert int(steps.max()) <= 1, (what, int(steps.max()))
            moved = float((steps > 0).float().mean())
            assert moved <= max_fraction, (what, moved)
""")

QUANT = PRELUDE + textwrap.dedent("""
    torch.manual_seed(0)
    for rows, cols in ((5, 96), (3, 300), (1, 8), (4, 5000), (2, 2048)):
        x = (torch.randn(rows, cols) * 3).half()
        x[0, 0] = 30.0  # an outlier sets its row's scale
        same(fq.quantize_rows(x), expected(x), ("rows", rows, cols), exact=True)
        same(fq.gelu_quant(x), expected(gelu_erf(x.float())), ("gelu", rows, cols),
             max_fraction=0.01)
        w, b, rb = (torch.randn(cols).half() for _ in range(3))
        ln = F.layer_norm(x.float(), (cols,), w.float(), b.float(), 1e-5)
        same(fq.layer_norm_quant(x, w, b, 1e-5), expected(ln), ("ln", rows, cols),
             max_fraction=0.01)
        y = torch.randn(rows, cols).half()
        s = x + y  # the residual, rounded to fp16 as the eager sum
        res, q, sc = fq.add_layer_norm_quant(x, y, w, b, 1e-5)
        assert torch.equal(res, s)
        ln = F.layer_norm(s.float(), (cols,), w.float(), b.float(), 1e-5)
        same((q, sc), expected(ln), ("add_ln", rows, cols), max_fraction=0.01)
        res_b, q_b, _ = fq.add_layer_norm_quant(x, y, w, b, 1e-5, residual_bias=rb)
        assert torch.equal(res_b, (s.float() + rb.float()).half()), "residual + next bias"
        assert torch.equal(q_b.view(torch.uint8), q.view(torch.uint8)), "bias not normalised"
    zeros = torch.zeros(2, 64).half()
    q, s = fq.quantize_rows(zeros)
    assert torch.equal(q.float(), zeros.float()) and bool((s > 0).all()), "a zero row stays zero"
    for bad in (lambda: fq.quantize_rows(torch.zeros(4, 6).half().t()),
                lambda: fq.add_layer_norm_quant(torch.zeros(2, 8).half(), torch.zeros(2, 4).half(),
                                                torch.ones(8).half(), torch.zeros(8).half(), 1e-5)):
        try:
            bad()
        except ValueError:
            pass
        else:
            raise AssertionError("a wrong layout or shape must be refused")
    print("ok")
""")

LAYERS = FIX_INTERPRETER + textwrap.dedent("""
    import tempfile
    from pathlib import Path
    import torch
    from gpuengine.models.attention import PackedLayout, PaddedAttention
    from gpuengine.models.esm2_weights import build_esm2, read_fair_esm_checkpoint
    from gpuengine.models.fp8 import Fp8Config, Fp8EagerKernels, Fp8TritonKernels, enable_fp8
    from gpuengine.synthetic import write_fair_esm_checkpoint

    class UnscaledPadded(PaddedAttention):  # a kernel that scales q itself, like varlen
        prescale_q = False

        def __call__(self, q, k, v, layout):
            return super().__call__(q * q.shape[-1] ** -0.5, k, v, layout)

    work = Path(tempfile.mkdtemp())
    path = write_fair_esm_checkpoint(work / "esm2_t2.pt", 2, 64, 4, seed=4)
    cfg, state, _ = read_fair_esm_checkpoint(path)
    lengths = torch.tensor([3, 40, 1, 17])
    layout = PackedLayout.build(lengths, int(lengths.sum()), int(lengths.max()), padded=True)
    ids = torch.randint(4, 24, (int(lengths.sum()),))
    torch.manual_seed(0)
    ids = torch.randint(4, 24, (int(lengths.sum()),))
    cosine = torch.nn.functional.cosine_similarity
    with torch.inference_mode():
        exact = build_esm2(cfg, state, torch.float32)(ids, layout, [2], PaddedAttention())[2]

    def compare(gemms, kernels):
        model = build_esm2(cfg, state, torch.float16)
        enable_fp8(model, torch.device("cpu"), Fp8Config.parse(gemms), allow_cpu=True)
        with torch.inference_mode():
            model.kernels = Fp8EagerKernels()
            eager = model(ids, layout, [2], UnscaledPadded())[2].float()
            model.kernels = kernels
            fast = model(ids, layout, [2], UnscaledPadded())[2].float()
        apart = 1 - float(cosine(eager, fast, dim=1).min())
        lost = 1 - float(cosine(eager, exact, dim=1).min())  # what this FP8 choice costs
        return apart, lost

    def within(apart, lost):
        # The implementations differ by the fp32 rounding of LayerNorm, RoPE and erf: an fp16
        # ulp here and there, which moves an e4m3 rounding now and then, so a mixed choice
        # (an fp16 GEMM feeding an FP8 one) ends up apart by a fraction of FP8's own error
        # (measured up to 0.2 of it on these weights).
        return apart <= max(0.35 * lost, 1e-5)

    for gemms in ("all", "qkv,fc1", "out_proj,fc2", "none"):
        apart, lost = compare(gemms, Fp8TritonKernels())
        print(gemms, apart, lost)
        assert within(apart, lost), (gemms, apart, lost)

    class WrongScales(Fp8TritonKernels):  # each token's GELU scale given to the next token
        def __init__(self):
            super().__init__()
            quant = self.fq.gelu_quant

            class Shifted:
                def __getattr__(self, name):
                    return getattr(fp8_triton, name)

                @staticmethod
                def gelu_quant(x):
                    q, s = quant(x)
                    return q, s.roll(1, 0)

            self.fq = Shifted()

    from gpuengine.models import fp8_triton
    apart, lost = compare("all", WrongScales())
    assert not within(apart, lost), ("a wrong scale must fail this comparison", apart, lost)
    print("ok")
""")


def test_fused_quantization_kernels_match_eager_quantization():
    run_interpreted(QUANT)


@pytest.mark.slow
def test_fp8_triton_layers_match_eager_fp8_layers():
    run_interpreted(LAYERS)


def test_fp8_kernels_compile_for_hopper():
    """Compiled (not interpreted) for sm_90 without a GPU: what the interpreter does not check
    (constexpr globals, types), and that the conversion is the hardware's round-to-nearest-even
    ``cvt.rn.satfinite.e4m3x2.f32`` with correctly rounded divisions for the scales."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gpuengine.models import fp8_triton as fq

    def ptx(kernel, signature, constexprs):
        source = ASTSource(fn=kernel.fn, signature=signature, constexprs=constexprs)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 8}).asm["ptx"]

    rows = {"x_ptr": "*fp16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "x_stride": "i32",
            "q_stride": "i32", "n_cols": "constexpr", "GELU": "constexpr", "BLOCK": "constexpr"}
    norm = {"x_ptr": "*fp16", "y_ptr": "*fp16", "res_ptr": "*fp16", "q_ptr": "*fp8e4nv",
            "s_ptr": "*fp32", "w_ptr": "*fp16", "b_ptr": "*fp16", "rbias_ptr": "*fp16",
            "n_cols": "i32", "stride": "i32", "q_stride": "i32", "eps": "fp32",
            "HAS_Y": "constexpr", "HAS_RBIAS": "constexpr", "BLOCK": "constexpr"}
    for code in (ptx(fq._rows_quant, rows, {"n_cols": 10240, "GELU": True, "BLOCK": 2048}),
                 ptx(fq._layer_norm_quant, norm, {"HAS_Y": True, "HAS_RBIAS": True,
                                                  "BLOCK": 4096})):
        assert "cvt.rn.satfinite.e4m3x2.f32" in code
        assert code.count("div.rn.f32") == 2  # 448 / amax and amax / 448
