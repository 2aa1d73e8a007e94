#!/usr/bin/env python3
"""FP8 against fp16 on one GPU (issue 17): what each choice of FP8 GEMMs costs in fidelity and
gains in speed, with the GEMM ceilings burst and sustained, all in one run on random weights of
the real ESM-2 shape (plain, and with outlier channels: gpuengine.synthetic.outlier_stress).

    python tools/bench_fp8.py --out fp8.jsonl            # 3B, virnucpro150 + uniprot, ~6-8 min
    python tools/bench_fp8.py --out fp8.jsonl --quick    # 150M, small sizes: a ~1 min smoke test

Steps (each prints a timestamped line; each record is appended to --out as it is made):

1. ``gemm-ceilings``: bf16 GEMM (16384 × d by d × 4d) and the same GEMM in e4m3 through
   ``torch._scaled_mm`` with row-wise scales, each burst (20 products, ≈ 0.1 s) and sustained
   (≥ 3 s), with NVML clocks; per workload ``gemm-ceiling`` rows (bf16 burst, the ceiling of
   docs/benchmarks.md) carry the other three as tokens/s too.
2. fp32 references (eager, exact) of a cosine sample of each workload, plain and stress weights.
3. ``gpuengine`` fp16 (the engine's default kernels): residues/s through the device worker,
   ``cos_min_plain`` / ``cos_min_stress`` to fp32, % of the burst and sustained bf16 ceilings.
4. ``gpuengine-fp8`` for each FP8 GEMM choice of ``--choices`` (``all``; ``-qkv`` = all but
   qkv; ``qkv+fc1``; ``none`` = the FP8 kernels with every GEMM in fp16; ``default`` = the run
   default, gpuengine.models.fp8.DEFAULT_FP8): residues/s (every workload for the first choice
   and the run default, the first workload for the others), cosines plain and stress; the
   run default's rows carry ``fp8_default: true``.
5. ``hf-sdpa-bf16``: transformers' EsmModel, SDPA, bf16 (tools/bench_esm.py's runner), the
   better of budgets 16 384 and 65 536 as bench_esm.py reports it.
6. ``fidelity-guard``: the guard a ``--precision fp8`` run performs (gpuengine.fidelity.measure:
   fp8 with the run default's GEMMs against fp16, 256 sequences of the first workload), plain
   and stress.
7. ``gpuengine-e2e`` (unless --no-e2e): ``gpuengine embed --precision fp8`` in-process on the
   first workload, FASTA → LMDB, the guard included (its measurement and seconds in the
   record's ``fidelity``). The checkpoint is written once into ``--workdir`` as
   ``esm2_t36_3B_UR50D.pt`` (3B), the name tools/bench_predict.py reuses from the same
   ``--workdir``.

The summary at the end prints what decides the open questions: the FP8 choice with the best
speed whose plain-weights guard passes, fp8 ÷ fp16 and fp8 ÷ HF per workload (goals 1.35× and
2.0×), fp16 ÷ the sustained bf16 ceiling (goal 90 %).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (GpuClocks, ResultsLog, add_commit_option, drive_worker,  # noqa: E402
                          gemm_rate, product_rate, require_cuda)
from bench_esm import (MODELS, flops_per_sequence, hf_model, proteins, run_hf,  # noqa: E402
                       workload_lengths, write_fasta)
from gpuengine.fidelity import embed_items, item_cosines, measure  # noqa: E402
from gpuengine.models.esm2 import Esm2Config  # noqa: E402
from gpuengine.models.esm2_weights import build_esm2  # noqa: E402
from gpuengine.models.fp8 import (DEFAULT_FP8, GEMMS, Fp8Config,  # noqa: E402
                                  fp8_unsupported_reason)
from gpuengine.packing import WorkItem  # noqa: E402
from gpuengine.pooling import PoolingRule  # noqa: E402
from gpuengine.runner import DTYPES, Runner  # noqa: E402
from gpuengine.store.codec import sequence_digest  # noqa: E402
from gpuengine.store.schema import OutputSpec  # noqa: E402
from gpuengine.synthetic import ESM2_SHAPES, outlier_stress, random_esm2_state  # noqa: E402
from gpuengine.tokenization import EsmTokenizer  # noqa: E402

T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s {dt.datetime.now():%H:%M:%S}] {message}", flush=True)


def choice_config(name: str) -> Fp8Config:
    """``all``, ``none``, ``default`` (the run default), ``-fc2`` (all but fc2), ``qkv+fc1``
    (those)."""
    if name == "default":
        return DEFAULT_FP8
    if name in ("all", "none"):
        return Fp8Config.parse(name)
    if name.startswith("-"):
        return Fp8Config(frozenset(GEMMS) - {name[1:]})
    return Fp8Config(frozenset(name.split("+")))


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# -- GEMM ceilings -------------------------------------------------------------------------------

def gemm_rates(d: int, sustained: float) -> dict:
    """TFLOP/s of the ceiling GEMM (16384 × d by d × 4d) in bf16 (bench_common.gemm_rate) and
    in e4m3 with row-wise scales (``torch._scaled_mm``, bf16 out), burst and sustained."""
    out = {}
    for mode, seconds in (("burst", 0.0), ("sustained", sustained)):
        rate, clocks = gemm_rate(d, seconds)
        out[f"bf16_{mode}_tflops"] = rate / 1e12
        out.update({f"bf16_{mode}_{k}": v for k, v in clocks.items() if k in CLOCK_KEYS})
        rate, clocks = fp8_gemm_rate(d, seconds)
        out[f"fp8_{mode}_tflops"] = rate / 1e12
        out.update({f"fp8_{mode}_{k}": v for k, v in clocks.items() if k in CLOCK_KEYS})
    return out


CLOCK_KEYS = ("sm_clock_mhz", "power_w", "power_capped")


def fp8_gemm_rate(d: int, seconds: float = 0.0, products: int = 20) -> tuple[float, dict]:
    """:func:`bench_common.gemm_rate` for e4m3 operands with row-wise fp32 scales (timed by
    :func:`bench_common.product_rate`)."""
    a = torch.randn(16384, d, device="cuda").to(torch.float8_e4m3fn)
    w = torch.randn(4 * d, d, device="cuda").to(torch.float8_e4m3fn)
    sa, sb = torch.ones(16384, 1, device="cuda"), torch.ones(1, 4 * d, device="cuda")

    def product():
        return torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

    return product_rate(product, 2 * 16384 * d * 4 * d, seconds, products=products)


# -- runners and measurements --------------------------------------------------------------------

class Bench:
    def __init__(self, args, layers: int, d: int, heads: int):
        self.args, self.layers, self.d, self.heads = args, layers, d, heads
        self.cfg = Esm2Config(layers, d, heads)
        self.out = OutputSpec(layers, "mean")
        self.records: list[dict] = []
        self.results = ResultsLog(args.out, args.commit, __file__, model=f"esm2-{args.model}")

    def emit(self, **record) -> dict:
        row = self.results.append(**record)
        self.records.append(row)
        log("record " + json.dumps({k: v for k, v in record.items() if v is not None}))
        return row

    def runner(self, state, precision: str, fp8: Fp8Config | None = None, compile: bool = True,
               kernels: str | None = None):
        model = build_esm2(self.cfg, dict(state), DTYPES[precision])
        return Runner(model, torch.device("cuda"), precision, [self.out], PoolingRule(1, 1),
                      compile=compile and precision != "fp32", fp8=fp8, kernels=kernels)

    def vectors(self, runner, items) -> np.ndarray:
        return np.stack(embed_items(runner, items, 16384, warm_up=False).vectors[self.out])

    def throughput(self, runner, items) -> dict:
        with GpuClocks() as clocks:
            r = drive_worker(runner, items, self.args.budget)
        return {"tokens_per_s": r["residues"] / r["seconds"],
                "sequences_per_s": r["sequences"] / r["seconds"], "seconds": r["seconds"],
                "sequences": r["sequences"], "busy_fraction": r["busy_fraction"],
                **clocks.summary()}


def cos_fields(vectors: dict, refs: dict, kind: str) -> dict:
    """min/mean cosine over every workload's sample, for ``kind`` (plain or stress)."""
    cos = np.concatenate([item_cosines(list(vectors[wl]), list(refs[wl])) for wl in refs])
    return {f"cos_min_{kind}": float(cos.min()), f"cos_mean_{kind}": float(cos.mean())}


def items_of(seqs):
    tok = EsmTokenizer()
    return [WorkItem(sequence_digest(s), tok.encode(s), len(s)) for s in seqs]


def even(seqs, n):
    picks = np.linspace(0, len(seqs) - 1, min(n, len(seqs))).round().astype(int)
    return [seqs[i] for i in sorted(set(picks.tolist()))]


# -- the steps -----------------------------------------------------------------------------------

def run(args) -> None:
    name = MODELS[args.model]
    layers, d, heads = ESM2_SHAPES[name]
    bench = Bench(args, layers, d, heads)
    log(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, model {name}, out {args.out}")
    from gpuengine.models.fp8 import _gemm_out_dtype
    log(f"_scaled_mm row-wise output dtype on this device: {_gemm_out_dtype(torch.device('cuda'))}")

    rates = gemm_rates(d, args.sustained)
    bench.emit(workload="-", system="gemm-ceilings", precision="bf16/fp8", tokens_per_s=None,
               m=16384, **rates, fp8_over_bf16_sustained=rates["fp8_sustained_tflops"]
               / rates["bf16_sustained_tflops"])
    workloads = {}
    for wl in args.workloads.split(","):
        rng = np.random.default_rng(42)
        lengths = workload_lengths(wl, args.residues, rng)
        seqs = proteins(lengths, rng)
        flops = float(flops_per_sequence(lengths, layers, d).sum() / lengths.sum())
        ceilings = {f"ceiling_{k.removesuffix('_tflops')}": v * 1e12 / flops
                    for k, v in rates.items() if k.endswith("_tflops")}
        workloads[wl] = {"seqs": seqs, "items": items_of(seqs), "ceilings": ceilings,
                         "cos_items": items_of(even(seqs, args.cos_sample)),
                         "mean_residues": round(float(lengths.mean()), 1)}
        bench.emit(workload=wl, system="gemm-ceiling", precision="bf16",
                   gemm_tflops=rates["bf16_burst_tflops"], tokens_per_s=ceilings["ceiling_bf16_burst"],
                   mean_residues=workloads[wl]["mean_residues"], **ceilings)
    log("building random weights (plain and outlier-stress) on the GPU")
    states = {"plain": random_esm2_state(layers, d, heads, seed=0, dtype=torch.float16,
                                         device="cuda")}
    states["stress"] = outlier_stress(states["plain"], seed=0)
    refs = {}
    for kind, state in states.items():
        runner = bench.runner(state, "fp32")
        refs[kind] = {wl: bench.vectors(runner, w["cos_items"]) for wl, w in workloads.items()}
        del runner
        free()
        log(f"fp32 reference ({kind}) done")
    fp16 = measure_fp16(bench, states, workloads, refs)
    fp8 = measure_fp8(bench, states, workloads, refs, args.choices.split(","))
    hf = measure_hf(bench, states["plain"], workloads) if not args.no_hf else {}
    measure_guard(bench, states, workloads)
    if not args.no_e2e:
        measure_e2e(bench, states["plain"], workloads)
    summarize(bench, workloads, fp16, fp8, hf)


def common(workloads, wl) -> dict:
    return {"workload": wl, "mean_residues": workloads[wl]["mean_residues"]}


def percent(bench_row: dict, ceilings: dict) -> dict:
    tps = bench_row["tokens_per_s"]
    return {"pct_of_ceiling": 100 * tps / ceilings["ceiling_bf16_burst"],
            "pct_of_sustained_ceiling": 100 * tps / ceilings["ceiling_bf16_sustained"],
            "pct_of_fp8_sustained_ceiling": 100 * tps / ceilings["ceiling_fp8_sustained"]}


def measure_fp16(bench, states, workloads, refs) -> dict:
    log("fp16 (the engine's default kernels)")
    runner = bench.runner(states["plain"], "fp16")
    speed = {wl: bench.throughput(runner, w["items"]) for wl, w in workloads.items()}
    cos = cos_fields({wl: bench.vectors(runner, w["cos_items"]) for wl, w in workloads.items()},
                     refs["plain"], "plain")
    kernels = runner.kernels
    del runner
    free()
    stress = bench.runner(states["stress"], "fp16")
    cos.update(cos_fields({wl: bench.vectors(stress, w["cos_items"])
                           for wl, w in workloads.items()}, refs["stress"], "stress"))
    del stress
    free()
    rows = {}
    for wl, s in speed.items():
        rows[wl] = bench.emit(**common(workloads, wl), system="gpuengine", precision="fp16",
                              kernels=kernels, budget=bench.args.budget, **s,
                              **percent(s, workloads[wl]["ceilings"]), **cos)
    for kind in bench.args.fp16_variants.split(","):  # other fp16 kernel kinds, first workload
        if kind in ("", "none"):
            continue
        wl = next(iter(workloads))
        log(f"fp16 variant: kernels {kind}")
        variant = bench.runner(states["plain"], "fp16", kernels=kind)
        s = bench.throughput(variant, workloads[wl]["items"])
        del variant
        free()
        bench.emit(**common(workloads, wl), system=f"gpuengine-variant:kernels-{kind}",
                   precision="fp16", kernels=kind, budget=bench.args.budget, **s,
                   **percent(s, workloads[wl]["ceilings"]))
    return rows


def measure_fp8(bench, states, workloads, refs, choices) -> dict:
    rows = {}
    first = next(iter(workloads))
    for choice in choices:
        config = choice_config(choice)
        log(f"fp8, GEMMs in FP8: {config.describe()} ({choice})")
        runner = bench.runner(states["plain"], "fp8", config)
        every = choice == choices[0] or config == DEFAULT_FP8
        timed = workloads if every else {first: workloads[first]}
        speed = {wl: bench.throughput(runner, w["items"]) for wl, w in timed.items()}
        cos = cos_fields({wl: bench.vectors(runner, w["cos_items"]) for wl, w in workloads.items()},
                         refs["plain"], "plain")
        kernels, out_dtype = runner.kernels, str(runner.model.fp8.gemm_out)
        del runner
        free()
        stress = bench.runner(states["stress"], "fp8", config)
        cos.update(cos_fields({wl: bench.vectors(stress, w["cos_items"])
                               for wl, w in workloads.items()}, refs["stress"], "stress"))
        del stress
        free()
        for wl, s in speed.items():
            rows[(choice, wl)] = bench.emit(
                **common(workloads, wl), system="gpuengine-fp8", precision="fp8",
                fp8_gemms=config.describe(), fp8_choice=choice,
                fp8_default=config == DEFAULT_FP8, kernels=kernels,
                gemm_out_dtype=out_dtype, budget=bench.args.budget, **s,
                **percent(s, workloads[wl]["ceilings"]), **cos)
    return rows


def measure_hf(bench, state, workloads) -> dict:
    log("HF EsmModel SDPA bf16")
    model = hf_model(state, bench.layers, bench.d, bench.heads)
    rows = {}
    for wl, w in workloads.items():
        run_hf(model, w["seqs"][:64], 65536)  # warm-up
        best = None
        for budget in (16384, 65536):  # as tools/bench_esm.py: the better of two budgets
            with GpuClocks() as clocks:
                res, nseq, secs = run_hf(model, w["seqs"], budget)
            if best is None or res / secs > best[0]["tokens_per_s"]:
                best = ({"tokens_per_s": res / secs, "sequences_per_s": nseq / secs,
                         "seconds": secs}, budget, clocks.summary())
        row, budget, clock = best
        rows[wl] = bench.emit(**common(workloads, wl), system="hf-sdpa-bf16", precision="bf16",
                              budget=budget, **row, **percent(row, w["ceilings"]), **clock)
    del model
    free()
    return rows


def measure_guard(bench, states, workloads) -> None:
    wl = next(iter(workloads))
    items = items_of(even(workloads[wl]["seqs"], 256))
    for kind, state in states.items():
        log(f"fidelity guard ({kind}): fp8 against fp16 on {len(items)} sequences of {wl}")
        report = measure(lambda p, s=state: bench.runner(s, p), items, threshold=0.99)
        bench.emit(workload=wl, system="fidelity-guard", weights=kind, tokens_per_s=None,
                   fp8_gemms=DEFAULT_FP8.describe(), **report.to_json())  # precision fp8, reference fp16, min/mean cosine, passed


def measure_e2e(bench, state, workloads) -> None:
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed
    from gpuengine.synthetic import write_fair_esm_checkpoint_from_state

    wl = next(iter(workloads))
    work = Path(bench.args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    pt = work / f"{MODELS[bench.args.model]}.pt"
    if not pt.exists():
        log(f"writing {pt} for the end-to-end run")
        write_fair_esm_checkpoint_from_state(pt, {k: v.cpu() for k, v in state.items()},
                                             bench.layers, bench.d, bench.heads)
    fasta = write_fasta(work / f"{wl}.fa", workloads[wl]["seqs"])
    store = work / "fp8.lmdb"
    import shutil

    shutil.rmtree(store, ignore_errors=True)
    log("gpuengine embed --precision fp8, in-process (FASTA -> LMDB, guard included)")
    summary = run_embed(EmbedConfig(inputs=(fasta,), model=str(pt), out=store, precision="fp8",
                                    max_tokens=bench.args.budget))
    shutil.rmtree(store, ignore_errors=True)
    bench.emit(**common(workloads, wl), system="gpuengine-e2e", precision="fp8",
               fp8_gemms=DEFAULT_FP8.describe(),
               tokens_per_s=summary.residues / summary.embed_seconds, wall_s=summary.wall_seconds,
               embed_s=summary.embed_seconds, sequences=summary.embedded,
               busy_fraction=summary.devices[0]["busy_fraction"], fidelity=summary.fidelity)


def summarize(bench, workloads, fp16, fp8, hf) -> None:
    print("\n# summary (what decides the open questions)", flush=True)
    first = next(iter(workloads))
    for wl in workloads:
        f16 = fp16[wl]["tokens_per_s"]
        print(f"{wl:14s} fp16 {f16:>9,.0f} res/s = {fp16[wl]['pct_of_sustained_ceiling']:.1f} % "
              f"of the sustained bf16 ceiling (goal 90 %), {fp16[wl]['pct_of_ceiling']:.1f} % of burst")
        for (choice, w), row in fp8.items():
            if w != wl:
                continue
            line = (f"{'':14s} fp8 {choice:10s} {row['tokens_per_s']:>9,.0f} res/s = "
                    f"{row['tokens_per_s'] / f16:.2f}x fp16 (goal 1.35x)")
            if wl in hf:
                line += f", {row['tokens_per_s'] / hf[wl]['tokens_per_s']:.2f}x HF (goal 2.0x)"
            line += f"; cos_min plain {row['cos_min_plain']:.5f} stress {row['cos_min_stress']:.5f}"
            print(line, flush=True)
    candidates = [(row["tokens_per_s"], choice, row) for (choice, wl), row in fp8.items()
                  if wl == first and choice != "none"]
    for speed, choice, row in sorted(candidates, reverse=True):
        print(f"choice {choice:10s} on {first}: {speed:>9,.0f} res/s, cos_min plain "
              f"{row['cos_min_plain']:.5f} (guard 0.99: {'pass' if row['cos_min_plain'] >= 0.99 else 'FAIL'})"
              f", stress {row['cos_min_stress']:.5f}"
              + ("  <- the run default" if row.get("fp8_default") else ""), flush=True)
    guards = [r for r in bench.records if r["system"] == "fidelity-guard"]
    for r in guards:
        print(f"guard {r['weights']:6s}: min cosine {r['min_cosine']:.5f} mean {r['mean_cosine']:.5f} "
              f"({'passed' if r['passed'] else 'refused'} at 0.99)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="results jsonl (appended)")
    ap.add_argument("--quick", action="store_true", help="150M shape, small sizes (~1 min)")
    ap.add_argument("--model", choices=sorted(MODELS), default=None, help="default 3B (150M with --quick)")
    ap.add_argument("--workloads", default="virnucpro150,uniprot")
    ap.add_argument("--residues", type=int, default=None, help="per workload (default 300000; quick 20000)")
    ap.add_argument("--cos-sample", type=int, default=None, help="sequences per workload for cosines (128; quick 16)")
    ap.add_argument("--choices", default=None,
                    help="FP8 GEMM choices; the first and the run default ('default', "
                         f"{DEFAULT_FP8.describe()}) are timed on every workload (default "
                         "all,-fc2,-out_proj,-qkv,-fc1,qkv+fc1,none; quick default,none)")
    ap.add_argument("--fp16-variants", default=None,
                    help="other fp16 kernel kinds timed on the first workload, or none "
                         "(default triton-fused-fc1; quick none)")
    ap.add_argument("--budget", type=int, default=65536)
    ap.add_argument("--sustained", type=float, default=None, help="seconds of the sustained GEMMs (3; quick 0.5)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpuengine-bench-fp8"))
    add_commit_option(ap)
    args = ap.parse_args()
    quick = args.quick
    args.model = args.model or ("150M" if quick else "3B")
    args.residues = args.residues or (20_000 if quick else 300_000)
    args.cos_sample = args.cos_sample or (16 if quick else 128)
    args.choices = args.choices or ("default,none" if quick
                                    else "all,-fc2,-out_proj,-qkv,-fc1,qkv+fc1,none")
    if args.fp16_variants is None:
        args.fp16_variants = "" if quick else "triton-fused-fc1"
    args.sustained = args.sustained if args.sustained is not None else (0.5 if quick else 3.0)
    require_cuda(__file__)
    reason = fp8_unsupported_reason(torch.device("cuda"))
    if reason:
        raise SystemExit(f"bench_fp8: {reason}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run(args)
    log("done")


if __name__ == "__main__":
    main()
