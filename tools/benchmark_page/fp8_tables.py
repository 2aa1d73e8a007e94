"""The page's tables of tools/bench_fp8.py's runs: GEMM ceilings burst and sustained, the
engine against each, fp16 against each FP8 GEMM choice, the fidelity guard, issue 17's goals."""

from __future__ import annotations

from benchmark_page.cells import fmt_int, short_model, table
from benchmark_page.labels import GOAL_FP8_FP16, GOAL_FP8_HF, GOAL_PREDICT_FP8_S, GOAL_SUSTAINED
from benchmark_page.records import fp8_run, latest_per_workload, run_peer


def fp8_tables(recs) -> list[str]:
    """tools/bench_fp8.py's records: the GEMM ceilings burst and sustained (bf16 and e4m3), the
    engine against each ceiling, fp16 and each FP8 GEMM choice of the same run (speed against
    fidelity), the fidelity guard, and issue 17's goals."""
    ceilings = [r for r in recs if r["system"] == "gemm-ceilings"]
    if not ceilings:
        return []
    out = []
    rows = [[f"`{r['commit']}`", short_model(r["model"])]
            + [f"{r[f'{p}_{m}_tflops']:.0f}" + (f" ({r[f'{p}_{m}_sm_clock_mhz']} MHz)"
                                                 if r.get(f"{p}_{m}_sm_clock_mhz") else "")
               for p in ("bf16", "fp8") for m in ("burst", "sustained")]
            + [f"{r['bf16_sustained_tflops'] / r['bf16_burst_tflops'] * 100:.0f} %",
               f"{r['fp8_over_bf16_sustained']:.2f}×"] for r in ceilings]
    out.append("### GEMM ceilings, burst and sustained (16384 × d by d × 4d; TFLOP/s, mean SM "
               "clock)\n\n" + table(["run", "model", "bf16 burst", "bf16 sustained ≥ 3 s",
                                       "e4m3 burst", "e4m3 sustained ≥ 3 s",
                                       "bf16 sustained ÷ burst", "e4m3 ÷ bf16 sustained"], rows))
    out.append(ceiling_table(recs, ceilings))
    rows = []
    for c in dict.fromkeys(r["commit"] for r in ceilings):
        run = fp8_run(recs, c)
        for r in run:
            if r["system"] not in ("gpuengine", "gpuengine-fp8", "gpuengine-fp8-choice") and \
                    not r["system"].startswith("gpuengine-variant:"):
                continue
            fp16, hf = run_peer(run, r["workload"], "gpuengine"), run_peer(run, r["workload"],
                                                                       "hf-sdpa-bf16")
            gemms = r.get("fp8_gemms", "—") + (" (**default**)" if r["system"] == "gpuengine-fp8"
                                               else "")
            rows.append([f"`{c}`", short_model(r["model"]), r["workload"], f"`{r['system']}`",
                         gemms, fmt_int(r["tokens_per_s"]),
                         f"{r['tokens_per_s'] / fp16['tokens_per_s']:.2f}×" if fp16 else "—",
                         f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}×" if hf else "—",
                         f"{r.get('pct_of_sustained_ceiling', float('nan')):.1f} %",
                         f"{r['cos_min_plain']:.6f}" if "cos_min_plain" in r else "—",
                         f"{r['cos_min_stress']:.6f}" if "cos_min_stress" in r else "—"])
    out.append("### FP8 against fp16 (`tools/bench_fp8.py`; cosines: min over the cosine sample "
               "of every workload, mean embeddings against fp32)\n\n" + table(
                   ["run", "model", "workload", "system", "GEMMs in e4m3", "residues/s",
                    "÷ fp16", "÷ HF bf16", "of the sustained bf16 ceiling", "cos_min_plain",
                    "cos_min_stress"], rows))
    guards = [r for r in recs if r["system"] == "fidelity-guard"]
    if guards:
        out.append("### The fidelity guard (fp8 against fp16 on 256 sequences)\n\n" + table(
            ["run", "model", "workload", "weights", "GEMMs in e4m3", "min cosine", "mean cosine",
             "at 0.99"],
            [[f"`{r['commit']}`", short_model(r["model"]), r["workload"], r["weights"],
              r.get("fp8_gemms", "all (before the default)"),
              f"{r['min_cosine']:.5f}", f"{r['mean_cosine']:.5f}",
              "passes" if r["passed"] else "refused"] for r in guards]))
    out.append(fp8_goals(recs, ceilings))
    return out


def ceiling_table(recs, ceilings) -> str:
    """Per run and workload: the four ceilings in residues/s, and fp16 (and the default fp8)
    as a share of each."""
    rows = []
    for c in dict.fromkeys(r["commit"] for r in ceilings):
        run = fp8_run(recs, c)
        for ceil in (r for r in run if r["system"] == "gemm-ceiling"):
            wl = ceil["workload"]
            values = [ceil[f"ceiling_{k_}"] for k_ in ("bf16_burst", "bf16_sustained",
                                                       "fp8_burst", "fp8_sustained")]
            for system, what in (("gpuengine", "fp16"), ("gpuengine-fp8", "fp8 (default)")):
                g = run_peer(run, wl, system)
                if g is None:
                    continue
                rows.append([f"`{c}`", short_model(ceil["model"]), wl, what,
                             f"**{fmt_int(g['tokens_per_s'])}**"]
                            + [f"{fmt_int(v)}: **{100 * g['tokens_per_s'] / v:.1f} %**"
                               for v in values])
    return ("### The engine against each ceiling (ceilings as residues/s: the GEMM rate ÷ the "
            "workload's FLOPs per residue; same run)\n\n"
            + table(["run", "model", "workload", "engine", "residues/s",
                     "bf16 burst ceiling: share", "bf16 sustained ceiling: share",
                     "e4m3 burst ceiling: share", "e4m3 sustained ceiling: share"], rows))


def fp8_goals(recs, ceilings) -> str:
    """Issue 17's goals, each from the latest bench_fp8 run that measured it."""
    rows = []
    for wl in ("virnucpro150", "uniprot"):
        runs_ = [fp8_run(recs, c) for c in dict.fromkeys(r["commit"] for r in ceilings)]
        timed = [run for run in runs_ if run_peer(run, wl, "gpuengine-fp8")]
        if not timed:
            allr = [run for run in runs_ if run_peer(run, wl, "gpuengine-fp8-choice")]
            rows.append([f"3B {wl}: default fp8 ≥ {GOAL_FP8_FP16}× fp16 and ≥ {GOAL_FP8_HF}× HF",
                         "the default (qkv, fc1, fc2) not timed on this workload yet"
                         + ("; all four GEMMs in e4m3: " + ", ".join(
                             f"{g['tokens_per_s'] / run_peer(run, wl, 'gpuengine')['tokens_per_s']:.2f}× "
                             f"fp16, {g['tokens_per_s'] / run_peer(run, wl, 'hf-sdpa-bf16')['tokens_per_s']:.2f}× HF "
                             f"(`{g['commit']}`)" for run in allr
                             for g in [run_peer(run, wl, 'gpuengine-fp8-choice')]) if allr else ""),
                         "not measured"])
            continue
        run = timed[-1]
        g, f, h = (run_peer(run, wl, s_) for s_ in ("gpuengine-fp8", "gpuengine", "hf-sdpa-bf16"))
        a, b = g["tokens_per_s"] / f["tokens_per_s"], g["tokens_per_s"] / h["tokens_per_s"]
        rows.append([f"3B {wl}: default fp8 ≥ {GOAL_FP8_FP16}× fp16 and ≥ {GOAL_FP8_HF}× HF",
                     f"{fmt_int(g['tokens_per_s'])} res/s = {a:.2f}× fp16, {b:.2f}× HF "
                     f"(`{g['commit']}`)",
                     "yes" if a >= GOAL_FP8_FP16 and b >= GOAL_FP8_HF else "**no**"])
    cos = latest_per_workload(r for r in recs if r["system"] == "gpuengine-fp8")
    if cos:
        rows.append(["3B default fp8: min cosine to fp32 published, plain and stress weights",
                     "; ".join(f"{r['workload']}: cos_min_plain {r['cos_min_plain']:.5f}, cos_min_stress "
                               f"{r['cos_min_stress']:.5f} (`{r['commit']}`)" for r in cos), "published"])
    guards = [r for r in recs if r["system"] == "fidelity-guard" and r["weights"] == "plain"]
    if guards:
        r = guards[-1]
        rows.append(["fidelity guard passes on plain weights (0.99)",
                     f"min cosine {r['min_cosine']:.5f} (`{r['commit']}`, GEMMs "
                     f"{r.get('fp8_gemms', 'all four')})", "yes" if r["passed"] else "**no**"])
    last = latest_per_workload(r for r in recs if r["system"] == "gpuengine"
                               and "pct_of_sustained_ceiling" in r)
    if last:
        pcts = [r["pct_of_sustained_ceiling"] for r in last]
        rows.append([f"fp16 ≥ {GOAL_SUSTAINED:.0f} % of the sustained bf16 GEMM ceiling",
                     ", ".join(f"{r['pct_of_sustained_ceiling']:.1f} % ({r['workload']}, `{r['commit']}`)"
                               for r in last),
                     "yes" if min(pcts) >= GOAL_SUSTAINED else "**no**"])
    pred = [r for r in recs if r["system"] == "gpuengine-predict" and r.get("precision") == "fp8"
            and r.get("reads") == 1_000_000]
    rows.append([f"`predict` 1 M reads, cold, fp8 ≤ {GOAL_PREDICT_FP8_S} s, label agreement "
                 "with fp16 reported",
                 f"{pred[-1]['wall_s']:.0f} s, labels agree on "
                 f"{100 * pred[-1]['label_agreement']:.2f} % of "
                 f"{fmt_int(pred[-1]['agreement']['frames'])} frames "
                 f"({pred[-1]['agreement']['subset']}; `{pred[-1]['commit']}`)" if pred
                 else "not run yet", ("yes" if pred[-1]["wall_s"] <= GOAL_PREDICT_FP8_S
                                      else "**no**") if pred else "not measured"])
    return "### Issue 17's goals (fp8; latest run of each)\n\n" + table(
        ["goal", "measured", "met?"], rows)
