#!/usr/bin/env python3
"""ESM-2 benchmark on a GPU: gpuengine against the peers a user would otherwise use, and the
GEMM ceiling, all measured in one run on random weights of the real shapes.

    python tools/bench_esm.py --models 3B,650M --workloads virnucpro150,virnucpro500,uniprot \\
        --systems gemm,gpuengine,hf,fair-esm --out results.jsonl

Systems (--systems, comma-separated)
  gemm          bf16 GEMM (16384 × d by d × 4d); its rate over FLOPs per residue is the ceiling;
                also the engine's four linear layers at its shapes, sustained (gemm-layer-skeleton)
  gpuengine     the engine's device worker (scheduler, stage/launch/finish, fp16, compiled
                per-layer kernels) over pre-tokenized items; --sweep measures several budgets
  e2e           `gpuengine embed` end to end: FASTA file → LMDB store (parse, validate, commit)
  host          the same with the GPU step replaced by a no-op (host-pipeline capacity); the
                only system that runs without a GPU (alone, it builds no runner); with
                --devices N (no-op devices), --cores N (cores used) or --curve 2,4,8,16 (one
                fresh run and row per core count); rows carry devices, cores, input_processes
  hf            transformers EsmModel, SDPA, bf16, length-sorted padded batches (best of budgets)
  fair-esm      fair-esm ESM2 fp32, toks_per_batch 2048, as VirNucPro calls it (a capped sample)
  cosine        fp16 and bf16 mean embeddings against fp32 on the GPU (no timing)
  variants      diagnostic: synchronous loop vs worker depth 1 vs one stream vs eager, other
                kernel kinds, FlexAttention instead of FlashAttention-2 varlen (--variants names)
  profile       torch.profiler kernel table of two batches (written next to --out)

Tokens are residues (BOS/EOS not counted), as in docs/performance; the ceiling is in the same
unit: GEMM FLOP/s ÷ FLOPs per residue, where a sequence of L residues costs
(L + 2) · layers · (24·d² + 4·(L + 2)·d) FLOPs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (GpuClocks, ResultsLog, add_commit_option, add_host_options,  # noqa: E402
                          closed_scheduler, limit_cores, run_curve,
                          cosine_summary, drive_worker, gemm_rate, profile_batches, run_e2e,
                          writers_option)
from gpuengine.config import environment  # noqa: E402
from gpuengine.input_workers import process_count  # noqa: E402
from gpuengine.models.esm2_weights import build_esm2  # noqa: E402
from gpuengine.packing import WorkItem  # noqa: E402
from gpuengine.pooling import PoolingRule  # noqa: E402
from gpuengine.runner import Runner  # noqa: E402
from gpuengine.store.codec import sequence_digest  # noqa: E402
from gpuengine.store.schema import OutputSpec  # noqa: E402
from gpuengine.synthetic import ESM2_SHAPES, random_esm2_state  # noqa: E402
from gpuengine.tokenization import EsmTokenizer  # noqa: E402

MODELS = {"3B": "esm2_t36_3B_UR50D", "650M": "esm2_t33_650M_UR50D", "150M": "esm2_t30_150M_UR50D",
          "8M": "esm2_t6_8M_UR50D"}
AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)


def workload_lengths(name: str, residues: int, rng: np.random.Generator) -> np.ndarray:
    """Protein lengths for a workload, about ``residues`` residues in total."""
    if name == "virnucpro150":
        sample = lambda n: rng.integers(48, 51, n)
    elif name == "virnucpro500":
        sample = lambda n: rng.integers(164, 167, n)
    elif name == "uniprot":
        sample = lambda n: np.clip(np.round(rng.lognormal(math.log(300), 0.57, n)), 30, 1022).astype(int)
    else:
        raise SystemExit(f"unknown workload {name}")
    lengths = sample(max(16, residues // 50))
    return lengths[: max(8, int(np.searchsorted(np.cumsum(lengths), residues)) + 1)]


def proteins(lengths: np.ndarray, rng: np.random.Generator) -> list[str]:
    return [AMINO[rng.integers(0, 20, n)].tobytes().decode() for n in lengths]


def flops_per_sequence(residues: np.ndarray, layers: int, d: int) -> np.ndarray:
    tokens = residues + 2
    return tokens * layers * (24.0 * d * d + 4.0 * tokens * d)


def timed(fn, sync=True) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start


# -- systems ------------------------------------------------------------------------------------

def make_runner(model, precision, compile_kernels=True, copy_stream=True, kernels=None,
                attention=None):
    runner = Runner(model, torch.device("cuda"), precision, [OutputSpec(model.num_layers, "mean")],
                    PoolingRule(1, 1), compile=compile_kernels, copy_stream=copy_stream,
                    kernels=kernels)
    if attention is not None:
        runner.attention, runner.padded = attention, attention.needs_padding
    return runner


def flex_attention(flex_max_len: int):
    """FlexAttention for batches whose longest sequence has at most ``flex_max_len`` tokens,
    FlashAttention-2 varlen for the others (variants ``attention-flex*``)."""
    from gpuengine.models.attention import VarlenAttention
    from gpuengine.models.flex import FlexDocumentAttention, LengthSwitchedAttention

    return LengthSwitchedAttention(VarlenAttention(), FlexDocumentAttention(), flex_max_len)


def _items(seqs):
    tok = EsmTokenizer()
    return [WorkItem(sequence_digest(s), tok.encode(s), len(s)) for s in seqs]


def run_pipeline(runner, seqs, budget, depth=2):
    """(residues, sequences, seconds, busy fraction) through the engine's device worker."""
    r = drive_worker(runner, _items(seqs), budget, depth)
    return r["residues"], r["sequences"], r["seconds"], r["busy_fraction"]


def run_sync(runner, seqs, budget):
    """Diagnostic: every batch staged, launched and finished in turn on the calling thread."""
    runner.calibrate(budget)
    sched = closed_scheduler(_items(seqs))
    batches = []
    while (b := sched.next_batch(0, budget)) is not None:
        batches.append(b.items)
    torch.cuda.synchronize()
    start = time.perf_counter()
    busy = sum(runner.embed(b).seconds for b in batches)
    seconds = time.perf_counter() - start
    return sum(i.residues for b in batches for i in b), sum(map(len, batches)), seconds, busy / seconds


def write_fasta(path, seqs):
    with open(path, "w") as f:
        for i, s in enumerate(seqs):
            f.write(f">p{i}\n{s}\n")
    return path


def profile_batch(runner, seqs, budget, out_dir, name="profile"):
    """Kernel time breakdown of two batches (torch.profiler), printed and saved."""
    profile_batches(runner, _items(seqs), budget, Path(out_dir) / f"{name}.txt", row_limit=22)


def gemm_skeleton(layers, d, tokens, seconds=3.0):
    """The four GEMMs of every layer at the engine's shapes, fp16, sustained: the practical
    ceiling of the linear layers (TFLOP/s)."""
    x = torch.randn(tokens, d, device="cuda", dtype=torch.float16)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5
          for n, k in ((3 * d, d), (d, d), (4 * d, d), (d, 4 * d))]
    h4 = torch.randn(tokens, 4 * d, device="cuda", dtype=torch.float16)
    flops = 2 * tokens * (3 * d * d + d * d + 4 * d * d + 4 * d * d)
    torch.cuda.synchronize()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for _ in range(layers):
            x @ ws[0].T
            x @ ws[1].T
            x @ ws[2].T
            h4 @ ws[3].T
        torch.cuda.synchronize()
        n += layers
    return n * flops / (time.perf_counter() - start)


def hf_model(state, layers, d, heads, device="cuda", dtype=torch.bfloat16):
    """transformers' EsmModel (SDPA) holding the same weights as ``state`` (fair-esm names)."""
    from transformers import EsmConfig, EsmModel

    from gpuengine.synthetic import hf_esm_state

    cfg = EsmConfig(vocab_size=33, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=4 * d, position_embedding_type="rotary", token_dropout=True,
                    pad_token_id=1, mask_token_id=32, max_position_embeddings=1026,
                    emb_layer_norm_before=False, layer_norm_eps=1e-5, attn_implementation="sdpa")
    with torch.device("meta"):
        model = EsmModel(cfg, add_pooling_layer=False)
    model = model.to_empty(device=device)
    for p in model.parameters():
        p.data.zero_()
    missing, _ = model.load_state_dict(hf_esm_state(state), strict=False)  # runs HF's inv_freq hook
    missing = [m for m in missing if "contact_head" not in m and "position_ids" not in m]
    if missing:
        raise SystemExit(f"HF model missing {missing[:5]}")
    model.embeddings.position_ids.copy_(torch.arange(model.embeddings.position_ids.shape[-1]))
    return model.to(dtype).eval()


def run_hf(model, seqs, budget, warm=2):
    tok = EsmTokenizer()
    order = np.argsort([len(s) for s in seqs], kind="stable")
    batches, cur = [], []
    for i in order:
        n = len(seqs[i]) + 2
        if cur and (len(cur) + 1) * max(n, max(len(seqs[j]) + 2 for j in cur)) > budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches.append(cur)
    padded = []
    for b in batches:
        L = max(len(seqs[i]) for i in b) + 2
        ids = torch.ones(len(b), L, dtype=torch.long)
        for r, i in enumerate(b):
            t = torch.from_numpy(tok.encode(seqs[i])).long()
            ids[r, : t.numel()] = t
        padded.append(ids)

    def one(ids):
        ids = ids.cuda(non_blocking=True)
        mask = ids.ne(1)
        with torch.inference_mode():
            h = model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
            body = mask.clone()
            body[:, 0] = False
            body &= ids.ne(2)
            pooled = (h.float() * body[..., None]).sum(1) / body.sum(1, keepdim=True)
        return pooled.cpu()

    for ids in padded[:warm]:
        one(ids)
    timed_b = list(zip(batches, padded))[warm:] or list(zip(batches, padded))
    residues = sum(len(seqs[i]) for b, _ in timed_b for i in b)
    seconds = timed(lambda: [one(ids) for _, ids in timed_b])
    return residues, sum(len(b) for b, _ in timed_b), seconds


def run_fair_esm(state_fp16, layers, d, heads, seqs, seconds_cap=25.0):
    import esm

    model = esm.ESM2(num_layers=layers, embed_dim=d, attention_heads=heads, alphabet="ESM-1b")
    model.load_state_dict({k: v.float() for k, v in state_fp16.items()}, strict=False)
    model = model.cuda().eval()
    alphabet = model.alphabet
    dataset = esm.FastaBatchedDataset([str(i) for i in range(len(seqs))], seqs)
    batches = dataset.get_batch_indices(2048, extra_toks_per_seq=1)
    converter = alphabet.get_batch_converter()
    done_res = done_seq = 0
    start = None
    with torch.no_grad():
        for bi, batch in enumerate(batches):
            if bi == 1:
                torch.cuda.synchronize()
                start = time.perf_counter()
            _, strs, toks = converter([(str(i), seqs[i]) for i in batch])
            out = model(toks.cuda(non_blocking=True), repr_layers=[layers])["representations"][layers]
            means = [out[r, 1:len(s) + 1].mean(0) for r, s in enumerate(strs)]
            torch.stack(means).cpu()
            if bi >= 1:
                done_res += sum(len(s) for s in strs)
                done_seq += len(strs)
                if time.perf_counter() - start > seconds_cap:
                    break
    torch.cuda.synchronize()
    return done_res, done_seq, time.perf_counter() - start


def cosine_check(state, layers, d, heads, n=48):
    from gpuengine.models.esm2 import Esm2Config

    rng = np.random.default_rng(1)
    seqs = proteins(workload_lengths("uniprot", 300 * n, rng)[:n], rng)
    cfg = Esm2Config(layers, d, heads)
    out = {}
    for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model = build_esm2(cfg, dict(state), dtype)
        items = _items(seqs)
        # fp32: the eager layers (fair-esm's numbers); half precision: the engine's default kernels
        runner = Runner(model, torch.device("cuda"), precision, [OutputSpec(layers, "mean")],
                        PoolingRule(1, 1), compile=precision != "fp32")
        out[f"{precision}_kernels"] = runner.kernels
        vecs = []
        for i in range(0, n, 8):
            vecs.extend(runner.embed(items[i:i + 8]).vectors[OutputSpec(layers, "mean")])
        out[precision] = np.stack(vecs)
        del model, runner
        torch.cuda.empty_cache()
    res = {}
    for p in ("fp16", "bf16"):
        a, b = out[p], out["fp32"]
        res[p] = {**cosine_summary(a, b), "max_abs_diff": float(np.abs(a - b).max()),
                  "kernels": out[f"{p}_kernels"]}
    return res


# -- driver -----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="3B")
    ap.add_argument("--workloads", default="virnucpro150,uniprot")
    ap.add_argument("--systems", default="gemm,gpuengine,hf,fair-esm")
    ap.add_argument("--residues", type=int, default=600_000, help="residues per workload")
    ap.add_argument("--budget", type=int, default=65536, help="gpuengine token budget")
    ap.add_argument("--sweep", default="", help="budgets to sweep on the first workload, e.g. 16384,32768,65536,131072")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--variants", default="", help="with system 'variants': which ones (default all)")
    ap.add_argument("--host-sequences", type=int, default=200_000)
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="the interpreter's thread switch interval in ms for this run (an experiment "
                         "on the host pipeline; Python's default is 5)")
    ap.add_argument("--slow-on", default="", help="run e2e and fair-esm only on these workloads (default: all)")
    ap.add_argument("--fair-esm-seconds", type=float, default=15.0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpuengine-bench"))
    ap.add_argument("--out", type=Path, required=True)
    add_commit_option(ap)
    add_host_options(ap)
    args = ap.parse_args()
    if args.curve:
        return run_curve(__file__, args.curve)
    cores = limit_cores(args.cores)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval / 1000)
    systems = args.systems.split(",")
    # every system but `host` runs the model on a GPU; `host` alone runs on any machine
    needs_gpu = bool(set(systems) - {"host"})
    if needs_gpu and not torch.cuda.is_available():
        raise SystemExit(f"systems {sorted(set(systems) - {'host'})} need a CUDA GPU; on this "
                         "machine only --systems host runs")
    log = ResultsLog(args.out, args.commit, __file__)
    args.workdir.mkdir(parents=True, exist_ok=True)
    records = []

    def emit(**rec):
        records.append(log.append(**rec))
        print(json.dumps(rec), flush=True)

    for short in args.models.split(","):
        name = MODELS[short]
        layers, d, heads = ESM2_SHAPES[name]
        # host alone needs the weights only to write the checkpoint, and only the first time
        pt_path = args.workdir / f"{name}.pt" if {"e2e", "host"} & set(systems) else None
        state = (random_esm2_state(layers, d, heads, seed=0, dtype=torch.float16,
                                   device="cuda" if torch.cuda.is_available() else "cpu")
                 if needs_gpu or not pt_path.exists() else None)
        rate, rate_clocks = gemm_rate(d) if "gemm" in systems else (None, {})
        if "gemm" in systems:
            with GpuClocks() as clocks:
                skel = gemm_skeleton(layers, d, args.budget)
            sustained, sustained_clocks = gemm_rate(d, seconds=3.0)
            emit(model=f"esm2-{short}", workload="-", system="gemm-layer-skeleton", precision="fp16",
                 tokens_per_s=None, sequences_per_s=None, gemm_tflops=skel / 1e12, burst_gemm_tflops=rate / 1e12,
                 sustained_ceiling_gemm_tflops=sustained / 1e12, **clocks.summary(),
                 **{f"burst_{k}": v for k, v in rate_clocks.items()},
                 **{f"sustained_ceiling_{k}": v for k, v in sustained_clocks.items()},
                 note=f"the 4 linear layers x {layers} at T={args.budget}, sustained 3 s; the "
                      "ceiling GEMM sustained 3 s; SM clock and power from NVML for each")
        if "cosine" in systems:
            emit(model=f"esm2-{short}", workload="uniprot48", system="cosine-vs-fp32",
                 precision="fp16/bf16", tokens_per_s=None, sequences_per_s=None,
                 **cosine_check(state, layers, d, heads))
            if set(systems) == {"cosine"}:
                del state
                torch.cuda.empty_cache()
                continue
        if pt_path is not None:
            t0 = time.perf_counter()
            if not pt_path.exists():
                from gpuengine.synthetic import write_fair_esm_checkpoint_from_state

                write_fair_esm_checkpoint_from_state(pt_path, {k: v.cpu() for k, v in state.items()},
                                                     layers, d, heads)
            print(f"# wrote {pt_path} in {time.perf_counter() - t0:.1f}s", flush=True)
        from gpuengine.models.esm2 import Esm2Config

        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
        runner = None
        if needs_gpu:
            runner = make_runner(build_esm2(Esm2Config(layers, d, heads), dict(state), dtype),
                                 args.precision, not args.no_compile)
            t0 = time.perf_counter()
            runner.calibrate(args.budget)
            print(f"# warm-up (compile) {time.perf_counter() - t0:.1f}s", flush=True)
        hf = hf_model(state, layers, d, heads) if "hf" in systems else None
        for wi, wl in enumerate(args.workloads.split(",")):
            rng = np.random.default_rng(42)
            lengths = workload_lengths(wl, args.residues, rng)
            seqs = proteins(lengths, rng)
            mean_len = float(lengths.mean())
            flops_res = float(flops_per_sequence(lengths, layers, d).sum() / lengths.sum())
            ceiling = rate / flops_res if rate else None
            common = dict(model=f"esm2-{short}", workload=wl, mean_residues=round(mean_len, 1))
            if rate:
                emit(**common, system="gemm-ceiling", precision="bf16", gemm_tflops=rate / 1e12,
                     tokens_per_s=ceiling, sequences_per_s=ceiling / mean_len)

            def report(system, precision, res, nseq, secs, **extra):
                tps = res / secs
                emit(**common, system=system, precision=precision, tokens_per_s=tps,
                     sequences_per_s=nseq / secs, seconds=secs, sequences=nseq,
                     pct_of_ceiling=100 * tps / ceiling if ceiling else None, **extra)

            if "profile" in systems and wi != 1:
                profile_batch(runner, seqs, args.budget, args.out.parent,
                              f"profile-{short}-{wl}-{runner.kernels}")
            if "variants" in systems and wi == 0:
                cfg_v = Esm2Config(layers, d, heads)
                for vname, kw, fn in (("sync-main-thread", {}, run_sync),
                                      ("worker-depth1", {}, lambda r, q, b: run_pipeline(r, q, b, depth=1)),
                                      ("worker-one-stream", {"copy_stream": False}, run_pipeline),
                                      ("worker-eager", {"compile_kernels": False}, run_pipeline),
                                      ("kernels-compiled", {"kernels": "compiled"}, run_pipeline),
                                      ("kernels-fused-rope", {"kernels": "fused-rope"}, run_pipeline),
                                      ("kernels-triton-fused-fc1", {"kernels": "triton-fused-fc1"}, run_pipeline),
                                      ("attention-flex", {"attention": flex_attention(1 << 20)}, run_pipeline)):
                    if args.variants and vname not in args.variants.split(","):
                        continue
                    vr = make_runner(build_esm2(cfg_v, dict(state), dtype), args.precision, **kw)
                    r = fn(vr, seqs, args.budget)
                    report(f"gpuengine-variant:{vname}", args.precision, *r[:3], budget=args.budget,
                           busy_fraction=r[3])
                    del vr
                    torch.cuda.empty_cache()
            if "gpuengine" in systems:
                budgets = [int(b) for b in args.sweep.split(",") if b] if wi == 0 and args.sweep else [args.budget]
                for budget in budgets:
                    with GpuClocks() as clocks:
                        r = run_pipeline(runner, seqs, budget)
                    report("gpuengine", args.precision, *r[:3], budget=budget, busy_fraction=r[3],
                           compiled=not args.no_compile, kernels=runner.kernels, **clocks.summary())
            slow_ok = not args.slow_on or wl in args.slow_on.split(",")
            if "e2e" in systems and slow_ok:
                fasta = write_fasta(args.workdir / f"{wl}.fa", seqs)
                summ = run_e2e(pt_path, fasta, args.budget, args.workdir)
                emit(**common, system="gpuengine-e2e", precision=args.precision,
                     tokens_per_s=summ.residues / summ.embed_seconds,
                     sequences_per_s=summ.embedded / summ.wall_seconds, wall_s=summ.wall_seconds,
                     embed_s=summ.embed_seconds, setup_s=summ.wall_seconds - summ.embed_seconds,
                     sequences=summ.embedded,
                     pct_of_ceiling=100 * summ.residues / summ.embed_seconds / ceiling if ceiling else None,
                     busy_fraction=summ.devices[0]["busy_fraction"])
            if hf is not None:
                best = None
                for budget in (16384, 65536):
                    with GpuClocks() as clocks:
                        r = run_hf(hf, seqs, budget)
                    print(f"#   hf budget {budget}: {r[0] / r[2]:,.0f} res/s", flush=True)
                    if best is None or r[0] / r[2] > best[0][0] / best[0][2]:
                        best = (r, budget, clocks.summary())
                report("hf-sdpa-bf16", "bf16", *best[0], budget=best[1], **best[2])
            if "fair-esm" in systems and slow_ok:
                r = run_fair_esm(state, layers, d, heads, seqs[:4000], args.fair_esm_seconds)
                report("fair-esm-fp32", "fp32", *r, budget=2048)
            if "host" in systems and wi == 0:
                hrng = np.random.default_rng(7)
                hseqs = proteins(workload_lengths(wl, int(args.host_sequences * mean_len), hrng), hrng)
                fasta = write_fasta(args.workdir / f"host-{wl}.fa", hseqs)
                summ = run_e2e(pt_path, fasta, args.budget, args.workdir, noop_dim=d,
                               devices=args.devices, writers=writers_option(args.writers))
                emit(**common, system="gpuengine-host", precision="none", tokens_per_s=summ.residues / summ.embed_seconds,
                     sequences_per_s=summ.embedded / summ.embed_seconds, wall_s=summ.wall_seconds,
                     embed_s=summ.embed_seconds, sequences=summ.embedded,
                     switch_interval_ms=sys.getswitchinterval() * 1000, workdir=str(args.workdir),
                     input_process=os.environ.get("GPUENGINE_INPUT_PROCESS", "auto"),
                     writer_process=os.environ.get("GPUENGINE_WRITER_PROCESS", "auto"),
                     writers=summ.writers, writers_option=args.writers,
                     commit_transactions=summ.commit_transactions,
                     commit_seconds=summ.commit_seconds,
                     commit_wait_seconds=summ.commit_wait_seconds,
                     devices=args.devices, cores=cores,
                     main_cpu_us_per_seq=1e6 * summ.main_cpu_seconds / max(1, summ.embedded),
                     input_processes=process_count(environment().input_processes,
                                                   heavy=False),
                     note="GPU step replaced by a no-op; parse+validate+plan+schedule+commit")
        del runner, hf, state
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print("\n# summary")
    for r in records:
        if r.get("tokens_per_s"):
            print(f"{r['model']:10s} {r['workload']:14s} {r['system']:22s} {r['tokens_per_s']:>12,.0f} tok/s"
                  + (f"  {r['pct_of_ceiling']:5.1f}% of ceiling" if r.get("pct_of_ceiling") else "")
                  + (f"  budget {r['budget']}" if r.get("budget") else ""))


if __name__ == "__main__":
    main()
