"""The Triton kernels (in-place RoPE, LayerNorm, residual + LayerNorm, GELU, GLU gate) against
the eager torch operations they replace, in Triton's CPU interpreter.

Runs where Triton is installed (CUDA builds of torch bring it; CI's CPU torch does not, so it
is skipped there); on the GPU the same kernels run inside the models in ``tests/test_gpu.py``
and ``tests/test_dnabert_s.py`` (``-m gpu``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed")

ROPE = textwrap.dedent("""
    import torch
    from gpuengine.models.rotary import apply_rotary, rotary_half_tables, rotary_tables
    from gpuengine.models.rotary_triton import rotate_qk_inplace

    torch.manual_seed(0)
    heads, dim = 3, 8
    lengths = torch.tensor([1, 5, 17, 2])
    positions = torch.cat([torch.arange(int(n)) for n in lengths])
    total = positions.numel()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    for dtype in (torch.float32, torch.float16):
        qkv = torch.randn(total, 3 * heads * dim).to(dtype)
        q, k, v = qkv.view(total, 3, heads, dim).unbind(1)
        cos, sin = rotary_tables(positions, inv_freq)
        want_q, want_k, want_v = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.clone()
        rotate_qk_inplace(qkv, *rotary_half_tables(positions, inv_freq), heads)
        got_q, got_k, got_v = qkv.view(total, 3, heads, dim).unbind(1)
        tol = 1e-6 if dtype == torch.float32 else 1e-3
        assert torch.equal(got_v, want_v), "v must be untouched"
        assert (got_q.float() - want_q.float()).abs().max() <= tol, dtype
        assert (got_k.float() - want_k.float()).abs().max() <= tol, dtype
    try:
        rotate_qk_inplace(torch.zeros(4, 10), torch.zeros(4, 4), torch.zeros(4, 4), 3)
    except ValueError:
        pass
    else:
        raise AssertionError("a qkv of the wrong width must be refused")
    print("ok")
""")

POINTWISE = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from gpuengine.models import pointwise_triton as pt

    torch.manual_seed(0)

    def close(got, want, tol, what):
        diff = (got.float() - want.float()).abs().max().item()
        assert diff <= tol, f"{what}: {diff}"

    for dtype, tol in ((torch.float32, 2e-6), (torch.float16, 2e-3)):
        for rows, cols in ((5, 96), (3, 300), (1, 8)):  # non-power-of-two widths are masked
            x = (torch.randn(rows, cols) * 3 + 1).to(dtype)
            y = torch.randn(rows, cols).to(dtype)
            w, b, rb = (torch.randn(cols).to(dtype) for _ in range(3))
            ref_ln = F.layer_norm(x.float(), (cols,), w.float(), b.float(), 1e-5)
            close(pt.layer_norm(x, w, b, 1e-5), ref_ln, tol, "layer_norm")
            s = x + y  # rounded to the dtype, as the kernel's residual
            res, normed = pt.add_layer_norm(x, y, w, b, 1e-5)
            assert torch.equal(res, s), "the residual is x + y in the dtype"
            close(normed, F.layer_norm(s.float(), (cols,), w.float(), b.float(), 1e-5), tol,
                  "add_layer_norm")
            res_b, normed_b = pt.add_layer_norm(x, y, w, b, 1e-5, residual_bias=rb)
            assert torch.equal(res_b, (s.float() + rb.float()).to(dtype)), "residual + bias"
            assert torch.equal(normed_b, normed), "the bias is not normalised"
            assert torch.equal(pt.residual_layer_norm(x, y, w, b, 1e-5), normed)
            g = torch.randn(rows, cols).to(dtype)
            want = F.gelu(g.float())
            close(pt.gelu_(g.clone()), want, tol, "gelu_")
            glu = torch.randn(rows, 2 * cols).to(dtype)
            want = F.gelu(glu[:, :cols].float()).to(dtype).float() * glu[:, cols:].float()
            close(pt.gelu_mul(glu, cols), want, tol, "gelu_mul")
    for bad in (lambda: pt.gelu_mul(torch.zeros(2, 6), 2),
                lambda: pt.layer_norm(torch.zeros(4, 6).t(), torch.ones(4), torch.zeros(4), 1e-5)):
        try:
            bad()
        except ValueError:
            pass
        else:
            raise AssertionError("a wrong shape or layout must be refused")
    print("ok")
""")


MODELS = textwrap.dedent("""
    import sys, tempfile
    from pathlib import Path
    import numpy as np
    import torch
    import torch.nn.functional as F
    from gpuengine.models.attention import PackedLayout, PaddedAttention
    from gpuengine.models.esm2_weights import build_esm2, read_fair_esm_checkpoint
    from gpuengine.synthetic import write_dnabert_s, write_fair_esm_checkpoint

    class UnscaledPadded(PaddedAttention):  # a kernel that scales q itself, like varlen
        prescale_q = False

        def __call__(self, q, k, v, layout):
            return super().__call__(q * q.shape[-1] ** -0.5, k, v, layout)

    work = Path(tempfile.mkdtemp())
    lengths = torch.tensor([3, 40, 1, 17])
    layout = PackedLayout.build(lengths, int(lengths.sum()), int(lengths.max()), padded=True)
    ids = torch.randint(4, 24, (int(lengths.sum()),))
    cfg, state, _ = read_fair_esm_checkpoint(write_fair_esm_checkpoint(work / "esm2_t2.pt", 2, 64, 4))
    model = build_esm2(cfg, state, torch.float32)
    model.share_rope_tables_if_equal()
    for kind in ("triton", "triton-fused-fc1"):
        with torch.inference_mode():
            model.set_kernels("eager")
            eager = model(ids, layout, [1, 2], UnscaledPadded())
            model.set_kernels(kind)
            fast = model(ids, layout, [1, 2], UnscaledPadded())
        for layer in (1, 2):
            diff = (eager[layer] - fast[layer]).abs().max().item()
            assert diff <= 1e-5, ("esm2", kind, layer, diff)
    # flex: q, k, v projected into a buffer of the row bucket (64 rows for these 61)
    from gpuengine.models.flex import FlexDocumentAttention, flex_bucket
    assert flex_bucket(int(lengths.sum())) > int(lengths.sum())
    packed = PackedLayout.build(lengths, int(lengths.sum()), int(lengths.max()), padded=False)
    with torch.inference_mode():
        model.set_kernels("eager")
        eager = model(ids, layout, [1, 2], UnscaledPadded())
        model.set_kernels("triton")
        fast = model(ids, packed, [1, 2], FlexDocumentAttention(compiled=False))
    for layer in (1, 2):
        diff = (eager[layer] - fast[layer]).abs().max().item()
        assert diff <= 1e-5, ("esm2 flex", layer, diff)

    from gpuengine.models.dnabert_s import FlexAlibiAttention
    from gpuengine.models.dnabert_s_weights import build_dnabert_s, read_dnabert_s
    dcfg, dstate, _ = read_dnabert_s(write_dnabert_s(work / "dnabert", num_layers=2, embed_dim=96,
                                                     heads=6, intermediate=128, vocab=128, seed=3))
    dna = build_dnabert_s(dcfg, dstate, torch.float32)
    ids = torch.randint(5, 128, (int(lengths.sum()),))
    flex = FlexAlibiAttention(compiled=False)  # q, k, v in a buffer padded to the row bucket
    for kind in ("triton", "triton-fused-glu"):
        with torch.inference_mode():
            dna.set_kernels("eager")
            eager = dna(ids, layout, [1, 2], flex)
            dna.set_kernels(kind)
            fast = dna(ids, layout, [1, 2], flex)
        for layer in (1, 2):
            diff = (eager[layer] - fast[layer]).abs().max().item()
            assert diff <= 1e-5, ("dnabert-s", kind, layer, diff)
    print("ok")
""")


GEMMS = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from gpuengine.models.gemm_triton import linear_gelu, linear_glu

    torch.manual_seed(0)
    # rows and widths that leave partial tiles in every dimension
    for rows, k, n in ((1, 8, 16), (130, 72, 40), (257, 200, 300)):
        x = torch.randn(rows, k)
        w = torch.randn(n, k) / k ** 0.5
        b = torch.randn(n)
        want = F.gelu(F.linear(x, w, b))
        got = linear_gelu(x, w, b)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5, ("gelu", rows, k, n)
        assert (linear_gelu(x, w, None) - F.gelu(F.linear(x, w))).abs().max().item() <= 1e-5
        wg = torch.randn(2 * n, k) / k ** 0.5
        h = F.linear(x, wg)
        want = F.gelu(h[:, :n]) * h[:, n:]
        got = linear_glu(x, wg, n)
        assert (got - want).abs().max().item() <= 1e-5, ("glu", rows, k, n)
    for bad in (lambda: linear_gelu(torch.zeros(4, 8), torch.zeros(5, 9), None),
                lambda: linear_glu(torch.zeros(4, 8), torch.zeros(5, 8), 3)):
        try:
            bad()
        except ValueError:
            pass
        else:
            raise AssertionError("mismatched shapes must be refused")
    print("ok")
""")


def run_interpreted(script: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1")  # read when triton.jit decorates a kernel
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_in_place_rope_equals_the_eager_rotary():
    run_interpreted(ROPE)


def test_row_and_pointwise_kernels_equal_the_eager_operations():
    run_interpreted(POINTWISE)


def test_models_with_triton_kernels_equal_their_eager_layers_in_fp32():
    """ESM-2's and DNABERT-S's ``triton`` kernel kinds (fc2 adding into the residual, strided
    q/k/v views; post-LN residual kernels, the GLU gate) give the eager layers' numbers in fp32
    (≤ 1e-5)."""
    run_interpreted(MODELS)


def test_gemm_with_activation_epilogue_equals_linear_then_activation():
    """fc1 + GELU and the GLU's gated GEMM in one kernel against ``F.linear`` then the
    activation, fp32 (≤ 1e-5), with partial tiles in every dimension."""
    run_interpreted(GEMMS)
