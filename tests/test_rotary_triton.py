"""The in-place Triton RoPE kernel against the eager rotary, in Triton's CPU interpreter.

Runs where Triton is installed (CUDA builds of torch bring it; CI's CPU torch does not, so it
is skipped there); the GPU run of the same kernel is covered by ``tests/test_gpu.py``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton is not installed")

SCRIPT = textwrap.dedent("""
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


def test_in_place_rope_equals_the_eager_rotary():
    env = dict(os.environ, TRITON_INTERPRET="1")  # read when triton.jit decorates the kernel
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
