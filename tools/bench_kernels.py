#!/usr/bin/env python3
"""Memory bandwidth of the layers' Triton kernels at the real shapes, on a GPU.

    python tools/bench_kernels.py --out results.jsonl [--tokens 65536]
    python tools/bench_kernels.py --out results.jsonl --ffn-chunks 1024,2048,4096,8192
    python tools/bench_kernels.py --out results.jsonl --gemm-only --inductor

For each kernel of :mod:`gpuengine.models.pointwise_triton` (LayerNorm, residual + LayerNorm,
GELU in place, DNABERT-S's GLU gate) at each model's width, every launch configuration is timed
(``triton.testing.do_bench``, median), next to the autotuner's choice, the torch op it replaces,
a one-pass candidate layout, and a device-to-device copy of the same bytes (the practical
ceiling). Rates count bytes read and written once. Kernel choices in the package follow these
tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import ResultsLog, add_commit_option, require_cuda  # noqa: E402
from gpuengine.models import pointwise_triton as pt  # noqa: E402

SHAPES = {  # model: (d, GELU width, GLU inner or None)
    "esm2-3B": (2560, 10240, None),
    "esm2-650M": (1280, 5120, None),
    "dnabert-s": (768, None, 3072),
}


@triton.jit
def _gelu_flat(x_ptr, n, BLOCK: tl.constexpr):
    """Candidate: in-place GELU over the flat contiguous tensor (no row/column split)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    g = 0.5 * xf * (1.0 + tl.math.erf(xf * 0.7071067811865476))
    tl.store(x_ptr + offs, g.to(x.dtype), mask=mask)


@triton.jit
def _layer_norm_rows(x_ptr, y_ptr, out_ptr, w_ptr, b_ptr, n_rows, n_cols, stride, eps,
                     BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """Candidate: residual + LayerNorm over BLOCK_R rows per program (weights loaded once)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    at = rows[:, None] * stride + cols[None, :]
    x = tl.load(x_ptr + at, mask=mask, other=0.0)
    x = (x.to(tl.float32) + tl.load(y_ptr + at, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=1) / n_cols
    centred = tl.where(mask, xf - mean[:, None], 0.0)
    var = tl.sum(centred * centred, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, (centred * rstd[:, None] * w[None, :] + b[None, :]).to(x.dtype), mask=mask)


def inductor_linear_gelu(x, w, b):
    """fc1 + erf GELU compiled by Inductor with ``max-autotune`` (its Triton GEMM templates,
    the persistent TMA one on Hopper, with the GELU fused into the epilogue where it wins)."""
    import torch._inductor.config as cfg

    cfg.triton.enable_persistent_tma_matmul = True
    fn = torch.compile(lambda x: F.gelu(F.linear(x, w, b)), mode="max-autotune-no-cudagraphs",
                       dynamic=False)
    fn(x)
    return lambda: fn(x)


def bench_gemm_epilogue(T, dtype, emit, bench, inductor: bool = False) -> None:
    """fc1 and its activation two ways at each model's shape: cuBLAS ``F.linear`` then the
    Triton pointwise kernel (the engine today), and :mod:`gpuengine.models.gemm_triton`'s one
    kernel; plus cuBLAS alone. TFLOP/s count the GEMM's 2·T·K·N."""
    from gpuengine.models import gemm_triton as gt

    for model, (d, gelu_width, inner) in SHAPES.items():
        x = torch.randn(T, d, device="cuda", dtype=dtype)
        if gelu_width:
            w = torch.randn(gelu_width, d, device="cuda", dtype=dtype) / d ** 0.5
            b = torch.randn(gelu_width, device="cuda", dtype=dtype)
            n = gelu_width
            two = lambda: pt.gelu_(F.linear(x, w, b))  # noqa: E731
            fused = lambda: gt.linear_gelu(x, w, b)  # noqa: E731
            alone = lambda: F.linear(x, w, b)  # noqa: E731
            kernel = "fc1+gelu"
        else:
            w = torch.randn(2 * inner, d, device="cuda", dtype=dtype) / d ** 0.5
            n = 2 * inner
            two = lambda: pt.gelu_mul(F.linear(x, w), inner)  # noqa: E731
            fused = lambda: gt.linear_glu(x, w, inner)  # noqa: E731
            alone = lambda: F.linear(x, w)  # noqa: E731
            kernel = "fc1+glu"
        flops = 2 * T * d * n
        diff = (two().float() - fused().float()).abs().max().item()
        variants = [("cublas-alone", alone), ("cublas+triton-pointwise", two), ("fused-triton", fused)]
        diff_inductor = None
        if inductor and gelu_width:
            variants.append(("inductor-max-autotune", inductor_linear_gelu(x, w, b)))
            diff_inductor = (two().float() - variants[-1][1]().float()).abs().max().item()
            print(f"{model}: inductor against cuBLAS + Triton GELU, max abs {diff_inductor:.3g}", flush=True)
        for variant, fn in variants:
            ms = bench(fn)
            emit(model=model, kernel=kernel, variant=variant, width=n, ms=ms, tflops=flops / ms / 1e9,
                 tb_per_s=None, config=str(gt._linear_act.best_config) if variant == "fused-triton" else None,
                 max_abs_diff_fused_vs_two=diff_inductor if variant == "inductor-max-autotune" else diff)


def ffn_chunked(x, residual, w1, b1, w2, act, rows):
    """The engine's FFN (``residual += act(x @ w1ᵀ + b1) @ w2ᵀ``, the residual already holding
    fc2's bias) over blocks of ``rows`` tokens: each block's (rows, 4d) activation is written
    and read back while it may still sit in L2, instead of the whole (T, 4d) tensor in DRAM."""
    for start in range(0, x.shape[0], rows):
        end = min(start + rows, x.shape[0])
        residual[start:end].addmm_(act(F.linear(x[start:end], w1, b1)), w2.t())
    return residual


def sustained_ms(fn, seconds: float) -> float:
    """Mean ms per call over a loop of at least ``seconds`` (the power-capped rate)."""
    once = do_bench(fn, warmup=5, rep=50, return_mode="median")
    n = max(1, int(seconds * 1e3 / once))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def bench_ffn_chunks(T, dtype, emit, seconds: float, chunks: list[int], rounds: int) -> None:
    """The FFN block at each model's shape, whole against token blocks of each size in
    ``chunks`` (alternated, ``rounds`` times, each timed over ≥ ``seconds``), and its two GEMMs
    alone (no activation: the floor a fused activation could reach). TFLOP/s count both
    GEMMs' 4·T·d·N."""
    for model, (d, gelu_width, inner) in SHAPES.items():
        n = gelu_width or 2 * inner
        x = torch.randn(T, d, device="cuda", dtype=dtype)
        residual = torch.randn(T, d, device="cuda", dtype=dtype)
        w1 = torch.randn(n, d, device="cuda", dtype=dtype) / d ** 0.5
        b1 = torch.randn(n, device="cuda", dtype=dtype) if gelu_width else None
        w2 = torch.randn(d, n // (1 if gelu_width else 2), device="cuda", dtype=dtype) / n ** 0.5
        act = pt.gelu_ if gelu_width else (lambda h: pt.gelu_mul(h, inner))
        whole = ffn_chunked(x, residual.clone(), w1, b1, w2, act, T).float()
        variants = {"gemms-alone": lambda: residual.addmm_(F.linear(x, w1, b1)[:, :w2.shape[1]], w2.t())}
        for rows in [T] + [c for c in chunks if c < T]:
            variants[f"rows-{rows}"] = lambda rows=rows: ffn_chunked(x, residual, w1, b1, w2, act, rows)
            got = ffn_chunked(x, residual.clone(), w1, b1, w2, act, rows).float()
            diff = (got - whole).abs().max().item()
            emit(model=model, kernel="ffn-check", variant=f"rows-{rows}", width=n, ms=None,
                 tflops=None, max_abs_diff_vs_whole=diff)
        flops = 4 * T * d * (gelu_width or inner) + (2 * T * d * inner if inner else 0)
        for r in range(rounds):
            for variant, fn in variants.items():
                ms = sustained_ms(fn, seconds)
                emit(model=model, kernel="ffn", variant=variant, width=n, ms=ms,
                     tflops=flops / ms / 1e9, round=r + 1, seconds=seconds)


def rate(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=65536)
    add_commit_option(ap)
    ap.add_argument("--gemm", action="store_true",
                    help="also time fc1 + activation: cuBLAS then the Triton kernel, against one fused kernel")
    ap.add_argument("--gemm-only", action="store_true", help="only that")
    ap.add_argument("--inductor", action="store_true",
                    help="with --gemm: also fc1 + GELU compiled by Inductor's max-autotune")
    ap.add_argument("--ffn-chunks", default="",
                    help="only the FFN block, whole against blocks of these many tokens, e.g. 1024,2048,4096")
    ap.add_argument("--seconds", type=float, default=3.0, help="--ffn-chunks: sustained loop per measurement")
    ap.add_argument("--rounds", type=int, default=2, help="--ffn-chunks: alternated rounds")
    args = ap.parse_args()
    args.gemm |= args.gemm_only
    require_cuda(__file__)
    T, dtype = args.tokens, torch.float16
    log = ResultsLog(args.out, args.commit, __file__, triton=triton.__version__, tokens=T)

    def emit(**rec):
        system = ("ffn-blocks" if rec["kernel"].startswith("ffn") else
                  "gemm-epilogue" if "tflops" in rec else "kernel-bandwidth")
        log.append(system=system,
                   workload=f"{rec['kernel']}@{rec['width']}", **rec)
        print(json.dumps(rec), flush=True)

    def bench(fn) -> float:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    if args.ffn_chunks:
        return bench_ffn_chunks(T, dtype, emit, args.seconds,
                                [int(c) for c in args.ffn_chunks.split(",")], args.rounds)
    if args.gemm:
        bench_gemm_epilogue(T, dtype, emit, bench, inductor=args.inductor)
        if args.gemm_only:
            return
    for model, (d, gelu_width, inner) in SHAPES.items():
        x = torch.randn(T, d, device="cuda", dtype=dtype)
        y = torch.randn_like(x)
        w = torch.randn(d, device="cuda", dtype=dtype)
        b = torch.randn_like(w)
        # residual + LayerNorm: read x, y; write LN (and the residual for add_layer_norm)
        nb = 3 * x.numel() * 2
        copy_src = torch.empty(3 * T * d // 2, device="cuda", dtype=dtype)
        copy_dst = torch.empty_like(copy_src)
        emit(model=model, kernel="copy", variant="torch-copy", width=d,
             tb_per_s=rate(2 * copy_src.numel() * 2, bench(lambda: copy_dst.copy_(copy_src))))
        pt.residual_layer_norm(x, y, w, b, 1e-5)  # tunes
        emit(model=model, kernel="residual_layer_norm", variant="autotuned", width=d,
             config=str(pt._layer_norm.best_config),
             tb_per_s=rate(nb, bench(lambda: pt.residual_layer_norm(x, y, w, b, 1e-5))))
        emit(model=model, kernel="residual_layer_norm", variant="torch", width=d,
             tb_per_s=rate(nb, bench(lambda: F.layer_norm(x + y, (d,), w, b, 1e-5))))
        out = torch.empty_like(x)
        block = triton.next_power_of_2(d)
        for rows_per in (1, 2, 4, 8):
            for warps in (2, 4, 8, 16):
                if rows_per * block // (32 * warps) < 1:
                    continue

                def ln_rows(rows_per=rows_per, warps=warps):
                    _layer_norm_rows[(triton.cdiv(T, rows_per),)](
                        x, y, out, w, b, T, d, d, 1e-5, BLOCK_R=rows_per, BLOCK=block, num_warps=warps)

                emit(model=model, kernel="residual_layer_norm", variant=f"rows{rows_per}-w{warps}",
                     width=d, tb_per_s=rate(nb, bench(ln_rows)))
        if gelu_width:
            h = torch.randn(T, gelu_width, device="cuda", dtype=dtype)
            nb = 2 * h.numel() * 2
            pt.gelu_(h)
            emit(model=model, kernel="gelu_", variant="autotuned", width=gelu_width,
                 config=str(pt._gelu.best_config), tb_per_s=rate(nb, bench(lambda: pt.gelu_(h))))
            emit(model=model, kernel="gelu_", variant="torch", width=gelu_width,
                 tb_per_s=rate(nb, bench(lambda: F.gelu(h))))
            for cfg in pt._gelu.configs:
                def one(cfg=cfg):
                    pt._gelu.fn[pt._pointwise_grid(T, gelu_width)(cfg.kwargs)](
                        h, h, T, gelu_width, gelu_width, gelu_width, 0, GATED=False,
                        **cfg.all_kwargs())
                emit(model=model, kernel="gelu_", variant=str(cfg), width=gelu_width,
                     tb_per_s=rate(nb, bench(one)))
            for block in (1024, 2048, 4096, 8192):
                for warps in (4, 8, 16):
                    def flat(block=block, warps=warps):
                        _gelu_flat[(triton.cdiv(h.numel(), block),)](h, h.numel(), BLOCK=block,
                                                                      num_warps=warps)
                    emit(model=model, kernel="gelu_", variant=f"flat{block}-w{warps}",
                         width=gelu_width, tb_per_s=rate(nb, bench(flat)))
        if inner:
            g = torch.randn(T, 2 * inner, device="cuda", dtype=dtype)
            nb = 3 * T * inner * 2
            pt.gelu_mul(g, inner)
            emit(model=model, kernel="gelu_mul", variant="autotuned", width=inner,
                 config=str(pt._gelu.best_config), tb_per_s=rate(nb, bench(lambda: pt.gelu_mul(g, inner))))
            emit(model=model, kernel="gelu_mul", variant="torch", width=inner,
                 tb_per_s=rate(nb, bench(lambda: F.gelu(g[:, :inner]) * g[:, inner:])))
            out = g.new_empty(T, inner)
            for r, c, warps in [(r, c, w) for r in (1, 2, 4, 8, 16) for c in (512, 1024, 2048)
                                for w in (4, 8)]:
                def glu(r=r, c=c, warps=warps):
                    pt._gelu.fn[(triton.cdiv(T, r), triton.cdiv(inner, c))](
                        g, out, T, inner, 2 * inner, inner, inner, GATED=True, BLOCK_R=r,
                        BLOCK_C=c, num_warps=warps)
                emit(model=model, kernel="gelu_mul", variant=f"r{r}-c{c}-w{warps}", width=inner,
                     tb_per_s=rate(nb, bench(glu)))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
