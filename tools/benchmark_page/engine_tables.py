"""The page's tables of the engine's own measurements: the runs, throughput against the
ceiling and HF, end to end, fair-esm, the host pipeline, reduced precision, DNABERT-S,
``predict``, the history and the diagnostic sweeps and variants."""

from __future__ import annotations

from benchmark_page.cells import fmt_int, short_model, table
from benchmark_page.labels import GOAL_HOST, RUN_LABEL, WORKLOADS
from benchmark_page.records import PageRecords, host_setting, latest, runs


def runs_overview(page: PageRecords) -> list[str]:
    """The runs: commit, date, GPU, torch, models, records and commands of each."""
    every = page.every
    out = []
    rows = []
    for c in runs(every):
        rs = [r for r in every if r["commit"] == c]
        cmds = sorted({r.get("command", "") for r in rs})
        rows.append([f"`{c}`", RUN_LABEL.get(c, ""), rs[0]["date"][:16].replace("T", " ") + " UTC",
                     # one commit may hold a GPU machine's rows and a CPU-only machine's: name each
                     # (a CPU-only tool's rows on a GPU machine have n_gpus 0: the most GPUs per machine)
                     ", ".join(f"{g} × {max(r['n_gpus'] for r in rs if r['gpu'] == g)}"
                               for g in dict.fromkeys(r["gpu"] for r in rs)),
                     ", ".join(dict.fromkeys(r["torch"] for r in rs if r.get("torch"))),
                     ", ".join(sorted({r["model"] for r in rs})), len(rs),
                     "<br>".join(f"`{c_}`" for c_ in cmds)])
    out.append("### The runs\n\n" + table(
        ["commit", "run", "date", "GPU", "torch", "models", "records", "command"], rows))
    return out


def throughput(page: PageRecords) -> list[str]:
    """Per (model, workload) its latest gpuengine run, with that run's ceiling and HF
    (and the latest end-to-end run)."""
    models, one, latest_run = page.models, page.one, page.latest_run
    out = []
    rows = []
    for m in models:
        for wl in WORKLOADS:
            run = latest_run(m, wl)
            if run is None:
                continue
            g = one(run, m, wl, "gpuengine")
            c = one(run, m, wl, "gemm-ceiling")
            h = one(run, m, wl, "hf-sdpa-bf16")
            e_run = latest_run(m, wl, "gpuengine-e2e")
            e = one(e_run, m, wl, "gpuengine-e2e") if e_run else None
            rows.append([
                short_model(m), wl, f"`{run}`", g.get("kernels", "compiled"), f"{g['mean_residues']:.1f}",
                f"{c['gemm_tflops']:.0f}", fmt_int(c["tokens_per_s"]),
                f"**{fmt_int(g['tokens_per_s'])}**", f"**{g['pct_of_ceiling']:.1f} %**", f"{g['busy_fraction']:.3f}",
                f"{fmt_int(h['tokens_per_s'])} (budget {h['budget']})",
                f"**{g['tokens_per_s'] / h['tokens_per_s']:.2f}×**",
                f"{fmt_int(e['tokens_per_s'])} ({e['pct_of_ceiling']:.1f} %, `{e_run}`)" if e else "not run"])
    out.append("### Throughput (1 GPU; each row from its latest run, ceiling and HF from the same run)\n\n"
               + table(["model", "workload", "run", "kernels", "mean aa", "GEMM TFLOP/s", "ceiling tok/s",
                        "gpuengine tok/s", "of ceiling", "busy", "HF SDPA bf16 tok/s", "gpuengine ÷ HF",
                        "e2e tok/s (of ceiling, run)"], rows))
    return out


def end_to_end(page: PageRecords) -> list[str]:
    """``gpuengine embed`` FASTA → LMDB: the latest run of each (model, workload)."""
    models, one, latest_run = page.models, page.one, page.latest_run
    out = []
    rows = []
    for m in models:
        for wl in WORKLOADS:
            run = latest_run(m, wl, "gpuengine-e2e")
            e = one(run, m, wl, "gpuengine-e2e") if run else None
            if e:
                rows.append([short_model(m), wl, f"`{run}`", fmt_int(e["sequences"]), f"{e['wall_s']:.2f}",
                             f"{e['embed_s']:.2f}", f"{e['setup_s']:.2f}", fmt_int(e["tokens_per_s"]),
                             fmt_int(e["sequences_per_s"]), f"{e['busy_fraction']:.3f}"])
    out.append("### End to end (`gpuengine embed`, FASTA → LMDB), latest run of each\n\n" + table(
        ["model", "workload", "run", "sequences", "wall s", "embed s", "setup s (wall − embed)",
         "tok/s over embed s", "seq/s over wall s", "busy"], rows))
    return out


def fair_esm(page: PageRecords) -> list[str]:
    """fair-esm fp32 as VirNucPro calls it, against HF and gpuengine."""
    recs, order, models, one = page.recs, page.order, page.models, page.one
    out = []
    rows = []
    for m in models:
        for wl in WORKLOADS:
            for c_ in order:
                f = one(c_, m, wl, "fair-esm-fp32")
                if f is None:
                    continue
                h = one(c_, m, wl, "hf-sdpa-bf16")
                g = latest(recs, model=m, workload=wl, system="gpuengine", n_gpus=1)
                rows.append([short_model(m), wl, f"`{c_}`", fmt_int(f["tokens_per_s"]), f"{f['pct_of_ceiling']:.1f} %",
                             fmt_int(f["sequences"]), f"{f['seconds']:.1f}",
                             fmt_int(h["tokens_per_s"]) if h else "—",
                             f"{h['tokens_per_s'] / f['tokens_per_s']:.1f}×" if h else "—",
                             f"{g['tokens_per_s'] / f['tokens_per_s']:.1f}×" if g else "—"])
    out.append("### fair-esm fp32 (as VirNucPro calls it)\n\n" + table(
        ["model", "workload", "run", "fair-esm tok/s", "of ceiling (same run)", "sequences timed", "seconds",
         "HF tok/s (same run)", "HF ÷ fair-esm (same run)", "gpuengine (its latest run) ÷ fair-esm (across runs)"], rows))
    return out


def host_pipeline(page: PageRecords) -> list[str]:
    """The host pipeline with the GPU step a no-op: every record (a run may measure
    settings side by side; a row rebuilt from a call's printed output may lack its times)."""
    recs, order, models = page.recs, page.order, page.models
    out = []
    rows = []
    host_models = models + ["dnabert-s"]
    for c_ in order:
        for m in host_models:
            for wl in WORKLOADS:
                for hp in (r for r in recs if (r["commit"], r.get("model"), r.get("workload"), r["system"])
                           == (c_, m, wl, "gpuengine-host")):
                    seconds = [f"{hp[k]:.1f}" if k in hp else "—" for k in ("wall_s", "embed_s")]
                    rows.append([f"`{c_}`", short_model(m), wl, host_setting(hp), fmt_int(hp["sequences"]),
                                 *seconds, f"**{fmt_int(hp['sequences_per_s'])}**",
                                 fmt_int(hp["tokens_per_s"]) if "tokens_per_s" in hp else "—",
                                 f"{hp['sequences_per_s'] / GOAL_HOST * 100:.0f} %"])
    out.append("### Host pipeline (GPU step replaced by a no-op)\n\n" + table(
        ["run", "model (dim of the zero vectors)", "workload", "setting", "sequences", "wall s", "pipeline s", "sequences/s",
         "residues/s", f"of the {GOAL_HOST // 1000} k seq/s goal"], rows))
    return out


def reduced_precision(page: PageRecords) -> list[str]:
    """fp16 and bf16 mean embeddings (last layer) against fp32."""
    recs = page.recs
    out = []
    rows = []
    for r in recs:
        if r["system"] == "cosine-vs-fp32":
            for p in ("fp16", "bf16", "padded_reference_fp16", "padded_reference_bf16",
                      "padded_reference_bf16-weights"):
                d = r.get(p)
                if d is None:
                    continue
                if p.endswith("-weights"):
                    what = "plain padded forward, fp32 arithmetic on weights rounded to bf16"
                elif p.startswith("padded"):
                    what = f"plain padded forward, {p.rsplit('_', 1)[1]}"
                else:
                    what = p + (f" (`{d['kernels']}` kernels)" if d.get("kernels") else "")
                rows.append([f"`{r['commit']}`", short_model(r["model"]), r["workload"], what,
                             f"{d['min_cosine']:.7f}", f"{d['mean_cosine']:.7f}",
                             f"{d['max_abs_diff']:.2e}" if "max_abs_diff" in d else "—"])
    out.append("### Reduced precision against fp32 (mean embeddings, last layer)\n\n" + table(
        ["run", "model", "sequences", "precision", "min cosine", "mean cosine", "max abs diff"], rows))
    return out


def dnabert_s(page: PageRecords) -> list[str]:
    """DNABERT-S by run and workload (none: no table)."""
    recs, order, one = page.recs, page.order, page.one
    out = []
    rows = []
    dna = [r for r in recs if r["model"] == "dnabert-s" and r.get("tokens_per_s")]
    for c_ in order:
        for wl in ("dna150", "dna500"):
            c = one(c_, "dnabert-s", wl, "gemm-ceiling")
            if c is None:
                continue
            for r in (x for x in dna if x["commit"] == c_ and x["workload"] == wl and x["system"] != "gemm-ceiling"):
                rows.append([f"`{c_}`", wl, f"{r.get('mean_tokens', 0):.1f}", f"`{r['system']}`",
                             r.get("kernels") or "—", fmt_int(r["tokens_per_s"]), fmt_int(r["sequences_per_s"]),
                             f"{r['pct_of_ceiling']:.1f} %", f"{r['busy_fraction']:.3f}" if r.get("busy_fraction") else "—",
                             fmt_int(r["budget"]) if r.get("budget") else "—"])
    if rows:
        out.append("### DNABERT-S (model tokens, CLS/SEP included)\n\n" + table(
            ["run", "workload", "mean tokens", "system", "kernels", "tok/s", "seq/s", "of ceiling", "busy",
             "budget"], rows))
    return out


def predict(page: PageRecords) -> list[str]:
    """``gpuengine predict`` runs, cold (none: no table)."""
    recs = page.recs
    out = []
    rows = []
    for r in recs:
        if r["system"] == "gpuengine-predict":
            st = r.get("stage_seconds", {})
            agree = r.get("agreement")
            rows.append([f"`{r['commit']}`", r["workload"], r.get("precision", "fp16"),
                         r["gpu"] + f" × {r['n_gpus']}", fmt_int(r["reads"]),
                         fmt_int(r["frames"]), f"**{r['wall_s']:.0f}**"]
                        + [f"{st.get(k_, 0):.1f}" for k_ in ("validate", "frames", "dnabert", "esm", "score")]
                        + [fmt_int(r["tokens_per_s"]),
                           f"{100 * r['label_agreement']:.2f} % of {fmt_int(agree['frames'])} "
                           f"frames ({agree['subset']}, {agree['reference']})" if agree else "—"])
    if rows:
        out.append("### `gpuengine predict` (cold: includes loading, hashing and warming the models)\n\n"
                   + table(["run", "workload", "ESM-2 precision", "GPU", "reads", "frames", "wall s",
                            "validate s", "frames s", "DNABERT-S s", "ESM-2 s", "score s", "ESM-2 tok/s",
                            "labels unchanged against the reference run"], rows))
    return out


def history(page: PageRecords) -> list[str]:
    """gpuengine's tokens/s and ÷ HF on each run, default kernels, budget 65 536."""
    recs, order, models, one = page.recs, page.order, page.models, page.one
    out = []
    esm_order = [c_ for c_ in order if any(r["commit"] == c_ and r["model"].startswith("esm2")
                                           and r["system"] in ("gpuengine", "gpuengine-compiled")
                                           for r in recs)]
    rows = []
    for m in models:
        for wl in WORKLOADS:
            row = [short_model(m), wl]
            seen = False
            for c_ in esm_order:
                g = (latest(recs, commit=c_, model=m, workload=wl, system="gpuengine-compiled")
                     or latest(recs, commit=c_, model=m, workload=wl, system="gpuengine", budget=65536)
                     or one(c_, m, wl, "gpuengine"))
                h = one(c_, m, wl, "hf-sdpa-bf16")
                if g:
                    seen = True
                    row.append(f"{fmt_int(g['tokens_per_s'])} ({g['pct_of_ceiling']:.1f} %)")
                    row.append(f"{g['tokens_per_s'] / h['tokens_per_s']:.2f}×" if h else "—")
                else:
                    row += ["—", "—"]
            if seen:
                rows.append(row)
    header = ["model", "workload"]
    for c_ in esm_order:
        header += [f"{RUN_LABEL.get(c_, c_)} `{c_}` tok/s (of ceiling)", "÷ HF"]
    out.append("### History: gpuengine (default kernels of each run, budget 65 536)\n\n" + table(header, rows))
    return out


def first_run_compiled(page: PageRecords) -> list[str]:
    """The first run's eager ``gpuengine`` rows beside its ``gpuengine-compiled`` ones."""
    order, models, one = page.order, page.models, page.one
    out = []
    rows = []
    c1 = order[0]
    for wl in WORKLOADS:
        for m in models:
            a = one(c1, m, wl, "gpuengine")
            b = one(c1, m, wl, "gpuengine-compiled")
            if a and b:
                rows.append([short_model(m), wl, fmt_int(a["tokens_per_s"]), f"{a['pct_of_ceiling']:.1f} %",
                             fmt_int(b["tokens_per_s"]), f"{b['pct_of_ceiling']:.1f} %"])
    out.append(f"### Run `{c1}`: `gpuengine` (eager) and `gpuengine-compiled` rows\n\n" + table(
        ["model", "workload", "gpuengine tok/s", "of ceiling", "gpuengine-compiled tok/s", "of ceiling"], rows))
    return out


def budget_sweeps(page: PageRecords) -> list[str]:
    """Runs that timed several token budgets (none: no table)."""
    recs, order, models = page.recs, page.order, page.models
    out = []
    rows = []
    for c_ in order:
        for m in models:
            for wl in WORKLOADS:
                sweep = sorted((r for r in recs if r["commit"] == c_ and r["model"] == m and r["workload"] == wl
                                and r["system"] == "gpuengine"), key=lambda r: r["budget"])
                if len(sweep) > 1:
                    for r in sweep:
                        rows.append([f"`{c_}`", short_model(m), wl, fmt_int(r["budget"]), fmt_int(r["tokens_per_s"]),
                                     f"{r['pct_of_ceiling']:.1f} %", f"{r['busy_fraction']:.3f}"])
    if rows:
        out.append("### Budget sweeps\n\n" + table(
            ["run", "model", "workload", "token budget", "gpuengine tok/s", "of ceiling", "busy"], rows))
    return out


def variants(page: PageRecords) -> list[str]:
    """Pipeline and kernel variants, diagnostic (none: no table)."""
    recs, one = page.recs, page.one
    out = []
    rows = []
    var = [r for r in recs if r["system"].startswith("gpuengine-variant:") and r["model"].startswith("esm2")]
    for r in var:
        ref = next((x for x in var if x["system"].endswith("sync-main-thread") and x["commit"] == r["commit"]
                    and x["model"] == r["model"] and x["workload"] == r["workload"]), None)
        ceil = one(r["commit"], r["model"], r["workload"], "gemm-ceiling")
        main = one(r["commit"], r["model"], r["workload"], "gpuengine")
        rows.append([f"`{r['commit']}`", short_model(r["model"]), r["workload"], f"`{r['system'].split(':', 1)[1]}`",
                     fmt_int(r["sequences"]), fmt_int(r["tokens_per_s"]),
                     f"{100 * r['tokens_per_s'] / ceil['tokens_per_s']:.1f} %" if ceil else "—",
                     f"{r['busy_fraction']:.3f}",
                     f"{r['tokens_per_s'] / ref['tokens_per_s']:.3f}" if ref else "—",
                     f"{r['tokens_per_s'] / main['tokens_per_s']:.3f} (`{main.get('kernels', 'compiled')}`)"
                     if main else "—"])
    if rows:
        out.append("### Pipeline and kernel variants (diagnostic)\n\n" + table(
            ["run", "model", "workload", "variant", "sequences", "tok/s", "of the main run's ceiling", "busy",
             "÷ sync-main-thread", "÷ the run's default"], rows))
    return out
