#!/usr/bin/env python3
"""DNABERT-S benchmark on a GPU, one run, random weights of the real shape (12 layers, d 768).

    python tools/bench_dnabert.py --out results.jsonl

Systems: ``gpuengine`` (packed, FlexAttention with ALiBi, compiled layer kernels, fp16, the
engine's device worker; a second pass over the same reads, after ``gpuengine-cold``, the
first, which pays for compiling FlexAttention for row buckets not seen yet), variants
(``gpuengine-variant:*``: compiled layer kernels without the Triton GLU; FlexAttention compiled
with static shapes, once per row bucket (the default is dynamic: one compilation); FlexAttention with flex's default 128-row blocks instead of 64; the gated GEMM and GLU gate
in one Triton kernel),
``padded-sdpa-bf16`` (length-sorted padded batches of 256, SDPA with an ALiBi + key-mask bias,
bf16: what a user would otherwise write), ``gemm-ceiling`` (bf16 GEMM 16384×768 by 768×3072;
its rate over FLOPs per token), and ``cosine-vs-fp32`` (fp16/bf16 means against fp32).
Tokens are model tokens (CLS and SEP included: DNABERT-S's mean covers them).
FLOPs per token: layers · (2·(d·3d + d² + d·2·I + I·d) + 4·L·d).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (ResultsLog, add_commit_option, cosine_summary, drive_worker,  # noqa: E402
                          gemm_rate, kernel_timeline, profile_batches, require_cuda)
from gpuengine.dna_tokenizer import DnaTokenizer  # noqa: E402
from gpuengine.models.dnabert_s import alibi_slopes  # noqa: E402
from gpuengine.models.dnabert_s_weights import build_dnabert_s, read_dnabert_s  # noqa: E402
from gpuengine.packing import WorkItem  # noqa: E402
from gpuengine.pooling import PoolingRule  # noqa: E402
from gpuengine.runner import Runner  # noqa: E402
from gpuengine.store.codec import sequence_digest  # noqa: E402
from gpuengine.store.schema import OutputSpec  # noqa: E402
from gpuengine.synthetic import write_dnabert_s  # noqa: E402


def reads(length: int, n: int, rng) -> list[str]:
    bases = np.frombuffer(b"ACGT", dtype=np.uint8)
    return [bases[rng.integers(0, 4, length)].tobytes().decode() for _ in range(n)]


def flops_per_token(cfg, mean_len: float) -> float:
    d, i = cfg.embed_dim, cfg.intermediate_size
    return cfg.num_layers * (2 * (d * 3 * d + d * d + d * 2 * i + i * d) + 4 * mean_len * d)


def padded_forward(sd, cfg, ids, mask, slopes):
    """A plain padded DNABERT-S forward (bf16, SDPA with an additive bias), mean over tokens."""
    p = "" if "embeddings.word_embeddings.weight" in sd else "bert."
    eps = cfg.layer_norm_eps
    B, L = ids.shape
    H, D, d, inter = cfg.attention_heads, cfg.head_dim, cfg.embed_dim, cfg.intermediate_size
    x = sd[p + "embeddings.word_embeddings.weight"][ids] + sd[p + "embeddings.token_type_embeddings.weight"][0]
    x = F.layer_norm(x, (d,), sd[p + "embeddings.LayerNorm.weight"], sd[p + "embeddings.LayerNorm.bias"], eps)
    pos = torch.arange(L, device=ids.device)
    alibi = -slopes[:, None, None] * (pos[None, :, None] - pos[None, None, :]).abs()
    bias = (alibi[None] + (1.0 - mask[:, None, None, :].float()) * -10000.0).to(x.dtype)
    for i in range(cfg.num_layers):
        q = f"{p}encoder.layer.{i}."
        qkv = F.linear(x, sd[q + "attention.self.Wqkv.weight"], sd[q + "attention.self.Wqkv.bias"])
        qkv = qkv.view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)
        a = a.transpose(1, 2).reshape(B, L, d)
        a = F.linear(a, sd[q + "attention.output.dense.weight"], sd[q + "attention.output.dense.bias"])
        x = F.layer_norm(x + a, (d,), sd[q + "attention.output.LayerNorm.weight"],
                         sd[q + "attention.output.LayerNorm.bias"], eps)
        g = F.linear(x, sd[q + "mlp.gated_layers.weight"])
        h = F.gelu(g[..., :inter]) * g[..., inter:]
        h = F.linear(h, sd[q + "mlp.wo.weight"], sd[q + "mlp.wo.bias"])
        x = F.layer_norm(x + h, (d,), sd[q + "mlp.layernorm.weight"], sd[q + "mlp.layernorm.bias"], eps)
    m = mask[..., None].float()
    return (x.float() * m).sum(1) / m.sum(1)


def run_padded(sd, cfg, token_lists, batch=256):
    slopes = torch.tensor(alibi_slopes(cfg.attention_heads), device="cuda")
    order = np.argsort([len(t) for t in token_lists], kind="stable")
    batches = []
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        L = max(len(token_lists[i]) for i in idx)
        ids = torch.zeros(len(idx), L, dtype=torch.long)
        mask = torch.zeros(len(idx), L, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(token_lists[i])] = torch.from_numpy(token_lists[i].astype(np.int64))
            mask[r, :len(token_lists[i])] = 1
        batches.append((ids, mask))
    with torch.inference_mode():
        for ids, mask in batches[:2]:
            padded_forward(sd, cfg, ids.cuda(), mask.cuda(), slopes).cpu()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for ids, mask in batches:
            padded_forward(sd, cfg, ids.cuda(non_blocking=True), mask.cuda(non_blocking=True), slopes).cpu()
        torch.cuda.synchronize()
    return sum(len(t) for t in token_lists), len(token_lists), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reads", type=int, default=60000)
    ap.add_argument("--budget", type=int, default=65536)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpuengine-bench"))
    add_commit_option(ap)
    ap.add_argument("--variants", action="store_true", help="also time the variants")
    ap.add_argument("--workloads", default="dna150,dna500")
    ap.add_argument("--no-cosine", action="store_true", help="skip the precision check")
    ap.add_argument("--no-baseline", action="store_true", help="skip the padded baseline")
    ap.add_argument("--sweep", default="", help="more token budgets to time, e.g. 131072,262144")
    ap.add_argument("--profile", action="store_true", help="kernel table of two dna150 batches")
    ap.add_argument("--timeline", action="store_true",
                    help="GPU idle gaps between kernels in the steady state (dna150/dna500, after timing)")
    args = ap.parse_args()
    require_cuda(__file__)
    log = ResultsLog(args.out, args.commit, __file__, model="dnabert-s")

    def emit(**rec):
        log.append(**rec)
        print(json.dumps(rec), flush=True)

    directory = args.workdir / "DNABERT-S_random"
    if not directory.exists():
        write_dnabert_s(directory, seed=0)
    cfg, state, _ = read_dnabert_s(directory)
    tok = DnaTokenizer.from_directory(directory)
    rate, _ = gemm_rate(cfg.embed_dim, products=200, warmup=5)  # d 768: 16384 × 768 by 768 × 3072
    rng = np.random.default_rng(0)
    # precision check
    sample = reads(150, 48, rng) + reads(500, 16, rng)
    items = [WorkItem(sequence_digest(s), tok.encode(s), len(s)) for s in sample]
    vecs = {}
    def make_runner(precision, compile=True, attention=None, kernels=None):
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        runner = Runner(build_dnabert_s(cfg, dict(state), dtype), torch.device("cuda"), precision,
                        [OutputSpec(cfg.num_layers, "mean")], PoolingRule(0, 0), compile=compile,
                        kernels=kernels)
        if attention is not None:
            runner.attention = attention
        return runner

    if not args.no_cosine:
        for precision in ("fp32", "fp16", "bf16"):
            runner = make_runner(precision)
            vecs[precision] = np.stack(runner.embed(items).vectors[OutputSpec(cfg.num_layers, "mean")])
        cos = {}
        for p in ("fp16", "bf16"):
            cos[p] = cosine_summary(vecs[p], vecs["fp32"])
        # the same check for the plain padded forward (the baseline below): how far half precision
        # itself moves these random-weight embeddings, independently of our kernels
        slopes = torch.tensor(alibi_slopes(cfg.attention_heads), device="cuda")
        token_lists = [tok.encode(s) for s in sample]
        ref = {}
        # "bf16-weights": fp32 arithmetic on weights rounded to bf16, the floor any bf16 run has
        for name, dtype, store in (("fp32", torch.float32, torch.float32),
                                   ("fp16", torch.float16, torch.float16),
                                   ("bf16", torch.bfloat16, torch.bfloat16),
                                   ("bf16-weights", torch.float32, torch.bfloat16)):
            sd = {k: v.to("cuda", store).to(dtype) for k, v in state.items()}
            rows = []
            with torch.inference_mode():
                for t in token_lists:
                    ids = torch.from_numpy(t.astype(np.int64))[None].cuda()
                    rows.append(padded_forward(sd, cfg, ids, torch.ones_like(ids), slopes)[0].cpu().numpy())
            ref[name] = np.stack(rows)
        for p in ("fp16", "bf16", "bf16-weights"):
            cos[f"padded_reference_{p}"] = cosine_summary(ref[p], ref["fp32"])
        emit(workload="dna150+dna500", system="cosine-vs-fp32", precision="fp16/bf16",
             tokens_per_s=None, sequences_per_s=None, **cos)
    runner = make_runner("fp16")
    variants = {}
    if args.variants:
        from gpuengine.models.dnabert_s import FlexAlibiAttention

        variants = {"compiled-kernels": lambda: make_runner("fp16", kernels="compiled"),
                    "flex-static": lambda: make_runner(
                        "fp16", attention=FlexAlibiAttention(compiled=True, dynamic=False)),
                    "fused-glu": lambda: make_runner("fp16", kernels="triton-fused-glu"),
                    "flex-block128": lambda: make_runner(
                        "fp16", attention=FlexAlibiAttention(compiled=True, block=128))}
    sd16 = {k: v.to("cuda", torch.bfloat16) for k, v in state.items()}
    for wl, length in (("dna150", 150), ("dna500", 500)):
        if wl not in args.workloads.split(","):
            continue
        seqs = reads(length, args.reads if length == 150 else args.reads // 3, rng)
        token_lists = tok.encode_batch(seqs)
        mean_len = float(np.mean([len(t) for t in token_lists]))
        ceiling = rate / flops_per_token(cfg, mean_len)
        common = dict(workload=wl, mean_tokens=round(mean_len, 1))
        emit(**common, system="gemm-ceiling", precision="bf16", gemm_tflops=rate / 1e12,
             tokens_per_s=ceiling, sequences_per_s=ceiling / mean_len)
        items = [WorkItem(sequence_digest(s), t, len(s)) for s, t in zip(seqs, token_lists)]
        if args.profile and wl == "dna150":
            profile_batches(runner, items, args.budget, args.out.parent / "profile-dnabert.txt")

        def timed_worker(system, r_, budget=args.budget):
            r = drive_worker(r_, items, budget)
            t, n, secs = r["tokens"], r["sequences"], r["seconds"]
            emit(**common, system=system, precision="fp16", tokens_per_s=t / secs,
                 sequences_per_s=n / secs, seconds=secs, pct_of_ceiling=100 * t / secs / ceiling,
                 attention=type(r_.attention).__name__, kernels=r_.kernels, budget=budget,
                 busy_fraction=r["busy_fraction"])

        timed_worker("gpuengine-cold", runner)
        timed_worker("gpuengine", runner)
        if args.timeline:
            tl = kernel_timeline(runner, items[: len(items) // 3], args.budget,
                                 args.out.parent / f"timeline-dnabert-{wl}.txt")
            emit(**common, system="kernel-timeline", precision="fp16", tokens_per_s=None,
                 sequences_per_s=None, budget=args.budget, **tl)
        for budget in (int(b) for b in args.sweep.split(",") if b):
            timed_worker("gpuengine-cold", runner, budget)
            timed_worker("gpuengine", runner, budget)
        for name, build in variants.items():
            vr = build()
            timed_worker(f"gpuengine-variant:{name}-cold", vr)
            timed_worker(f"gpuengine-variant:{name}", vr)
            del vr
        if args.no_baseline:
            continue
        t, n, secs = run_padded(sd16, cfg, token_lists)
        emit(**common, system="padded-sdpa-bf16", precision="bf16", tokens_per_s=t / secs,
             sequences_per_s=n / secs, seconds=secs, pct_of_ceiling=100 * t / secs / ceiling,
             batch_sequences=256)


if __name__ == "__main__":
    main()
