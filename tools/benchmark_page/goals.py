"""The page's table of goals: each goal against the latest run that measured it."""

from __future__ import annotations

from benchmark_page.cells import fmt_int, k, short_model, table
from benchmark_page.labels import GOAL_DNA_PCT, GOAL_HF, GOAL_HF_FIRST, GOAL_HOST, GOAL_HOST_CORES, GOAL_PCT, WORKLOADS
from benchmark_page.records import (PageRecords, engine_of, host_curve_rows, host_goal_rows,
                                    host_setting, latest)
from benchmark_page.scale_tables import scale_goals


def _runs(rows) -> str:
    """Host rows as ``rate (`commit`)``, comma-separated."""
    return ", ".join(f"{fmt_int(r['sequences_per_s'])} (`{r['commit']}`)" for r in rows)


def goals(page: PageRecords) -> list[str]:
    """Each goal against the latest run that measured it."""
    recs, models, one, latest_run = page.recs, page.models, page.one, page.latest_run
    out = []
    rows = []
    g3 = [one(latest_run("esm2-3B", wl), "esm2-3B", wl, "gpuengine") for wl in WORKLOADS
          if latest_run("esm2-3B", wl)]
    c3 = [one(g["commit"], "esm2-3B", g["workload"], "gemm-ceiling") for g in g3]
    pcts = [g["pct_of_ceiling"] for g in g3]
    goal_tps = sorted(GOAL_PCT / 100 * c["tokens_per_s"] for c in c3)
    rows.append([(f"ESM-2 3B at ≥ {GOAL_PCT:.0f} % of the GEMM ceiling (≈ {goal_tps[0] / 1000:.0f}–"
                  f"{k(goal_tps[-1], 0)} tok/s on this run's ceilings)"),
                 ", ".join(f"{p:.1f} %" for p in pcts) + f" ({', '.join(k(g['tokens_per_s']) for g in g3)} tok/s) on "
                 + ", ".join(g["workload"] for g in g3),
                 "**no**" if min(pcts) < GOAL_PCT else "yes"])
    for m in models:
        ratios = []
        for wl in WORKLOADS:
            run = latest_run(m, wl)
            g, h = (one(run, m, wl, "gpuengine"), one(run, m, wl, "hf-sdpa-bf16")) if run else (None, None)
            if g and h:
                ratios.append((wl, g["tokens_per_s"] / h["tokens_per_s"]))
        if not ratios:  # a model timed only by other tools (bench_replicas' 8M): no HF goal to judge
            continue
        txt = ", ".join(f"{r:.2f}× ({wl})" for wl, r in ratios)
        met = sum(r >= GOAL_HF for _, r in ratios)
        rows.append([f"{short_model(m)}: ≥ {GOAL_HF}× HF SDPA bf16 on every workload", txt,
                     "yes" if met == len(ratios) else ("**no**" if met == 0 else f"**no** ({met} of {len(ratios)})")])
        met15 = sum(r >= GOAL_HF_FIRST for _, r in ratios)
        rows.append([f"{short_model(m)}: ≥ {GOAL_HF_FIRST}× HF (what the first issue expected)", txt,
                     "yes" if met15 == len(ratios)
                     else ("**no**" if met15 == 0 else f"partly ({met15} of {len(ratios)})")])
    defaults = [r for r in recs if r["system"] == "gpuengine-host" and host_setting(r) == "default"]
    hosts = [latest(defaults, model=m, workload=wl) for m in models + ["dnabert-s"] for wl in WORKLOADS]
    hosts = [h for h in hosts if h]
    rows.append([f"host pipeline ≥ {GOAL_HOST // 1000} k sequences/s (store on disk, default settings)",
                 ", ".join(f"{fmt_int(h['sequences_per_s'])} seq/s ({short_model(h['model'])} dims, {h['workload']}, `{h['commit']}`)"
                           for h in hosts),
                 "yes" if min(h["sequences_per_s"] for h in hosts) >= GOAL_HOST else
                 ("**no**" if max(h["sequences_per_s"] for h in hosts) < GOAL_HOST else
                  "for " + ", ".join(f"{short_model(h['model'])} dims" for h in hosts if h["sequences_per_s"] >= GOAL_HOST)
                  + "; **not** for " + ", ".join(f"{short_model(h['model'])} dims" for h in hosts
                                                if h["sequences_per_s"] < GOAL_HOST))])
    curve = [r for r in host_curve_rows(recs) if r["cores"] == 16]
    judged = [r for r in host_goal_rows(recs) if r["cores"] == 16]
    for m, goal in GOAL_HOST_CORES.items():
        h = latest(judged, model=m)
        if h:  # the best 16-core row of the newest engine code (writers and budget as it says)
            h = max((r for r in judged if r["model"] == m and engine_of(r) == engine_of(h)),
                    key=lambda r: r["sequences_per_s"])
            same = [r for r in sorted(judged, key=lambda r: (r["_t"], r["_i"]))
                    if r["model"] == m and engine_of(r) == engine_of(h) and r is not h]
            earlier = [r for r in sorted(curve, key=lambda r: (r["_t"], r["_i"]), reverse=True)
                       if r["model"] == m and engine_of(r) != engine_of(h)
                       and r.get("devices") == h.get("devices")]
            rows.append([f"host pipeline, {short_model(m)} dims, 16 cores of the GPU machine: ≥ {goal // 1000} k "
                         "sequences/s (issue 16)",
                         f"{fmt_int(h['sequences_per_s'])} seq/s ({h.get('devices', 1)} no-op devices, "
                         f"{h.get('input_processes', '?')} input processes, {h.get('writers', 1)} writer(s)"
                         + (f", budget {h['budget']}" if h.get("budget") else "") + f", `{h['commit']}`"
                         + (", an alternated A/B row" if "A/B" in h.get("note", "") else "") + ")"
                         + (f"; the same engine code's other runs {_runs(same)}" if same else "")
                         + (f"; earlier {_runs(earlier)}" if earlier else ""),
                         "yes" if h["sequences_per_s"] >= goal else
                         f"**no** ({100 * (1 - h['sequences_per_s'] / goal):.0f} % short)"])
    rows.extend(scale_goals(recs))
    dna = [latest(recs, model="dnabert-s", workload=wl, system="gpuengine") for wl in ("dna150", "dna500")]
    dna = [d for d in dna if d]
    if dna:
        rows.append([f"DNABERT-S at ≥ {GOAL_DNA_PCT:.0f} % of the GEMM ceiling",
                     ", ".join(f"{d['pct_of_ceiling']:.1f} % ({d['tokens_per_s'] / 1e6:.2f} M tok/s, {d['workload']}, "
                               f"`{d['commit']}`)" for d in dna),
                     "yes" if min(d["pct_of_ceiling"] for d in dna) >= GOAL_DNA_PCT else "**no**"])
    cos = latest(recs, model="dnabert-s", system="cosine-vs-fp32")
    if cos:
        floor = cos.get("padded_reference_bf16-weights")
        rows.append(["DNABERT-S fp16 / bf16 against fp32: cosine ≥ 0.9999",
                     f"fp16 {cos['fp16']['min_cosine']:.6f}, bf16 {cos['bf16']['min_cosine']:.6f} (min over "
                     f"64 sequences, `{cos['commit']}`); the plain padded forward in bf16: "
                     f"{cos['padded_reference_bf16']['min_cosine']:.6f}"
                     + (f"; fp32 arithmetic on bf16-rounded weights: {floor['min_cosine']:.6f}" if floor else ""),
                     "fp16 yes; bf16 **no** (below the format's own floor on these weights)"
                     if cos["bf16"]["min_cosine"] < 0.9999 <= cos["fp16"]["min_cosine"] else "see data"])
    multi = sorted({r.get("n_gpus", 1) for r in recs} - {0, 1})  # 0: CPU-only tools
    rows.append(["two H200 ≥ 1.95× one", ", ".join(map(str, multi)) + "-GPU runs recorded" if multi else
                 "not measured: every record has n_gpus = 1 (no 2-GPU machine was lent)",
                 "not measured" if 2 not in multi else "see data"])
    out.append("### Goals (latest run of each measurement)\n\n" + table(["goal", "measured", "met?"], rows))
    return out
