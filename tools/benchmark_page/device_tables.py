"""The page's tables of what the GPU itself does: burst GEMM against the layer skeleton,
SM clock and power, kernel bandwidth, fc1 with its activation."""

from __future__ import annotations

from benchmark_page.cells import fmt_int, short_model, table
from benchmark_page.labels import WORKLOADS
from benchmark_page.records import PageRecords


def clock_row(r, prefix, what, tflops=None):
    return [f"`{r['commit']}`", short_model(r["model"]), what, f"{tflops:.0f}" if tflops else "—",
            str(r.get(prefix + "sm_clock_mhz", "—")),
            # NVML's power reading averages over about a second: meaningless for a 0.1 s burst
            "—" if prefix == "burst_" else f"{r.get(prefix + 'power_w', float('nan')):.0f}",
            f"{100 * r.get(prefix + 'power_capped', 0):.0f} %"]


def gemm_skeleton(page: PageRecords) -> list[str]:
    """The burst GEMM (the ceiling's rate) against the sustained layer skeleton."""
    order, models, one = page.order, page.models, page.one
    out = []
    rows = []
    for c_ in order:
        for m in models:
            s = one(c_, m, "-", "gemm-layer-skeleton")
            if s:
                # gpuengine's achieved FLOP/s = share of ceiling × burst rate (the ceiling's own rate)
                gs = [one(c_, m, wl, "gpuengine", budget=s.get("budget", 65536)) or one(c_, m, wl, "gpuengine")
                      for wl in WORKLOADS]
                gs = [g for g in gs if g and g.get("pct_of_ceiling")]
                pct = sum(g["pct_of_ceiling"] for g in gs) / len(gs) if gs else None
                rows.append([f"`{c_}`", short_model(m), f"{s['burst_gemm_tflops']:.0f}", f"{s['gemm_tflops']:.0f}",
                             f"**{100 * s['gemm_tflops'] / s['burst_gemm_tflops']:.0f} %**",
                             f"{pct:.1f} %" if pct else "—",
                             f"{pct * s['burst_gemm_tflops'] / s['gemm_tflops']:.0f} %" if pct else "—"])
    if rows:
        out.append("### Burst GEMM against the sustained layer skeleton\n\n" + table(
            ["run", "model", "burst bf16 GEMM TFLOP/s (the ceiling's rate)",
             "4 linear layers × all layers, fp16, sustained 3 s, TFLOP/s", "sustained ÷ burst",
             "gpuengine of ceiling (mean of workloads, same run)",
             "gpuengine's FLOP/s ÷ skeleton's (≈ share of its time in the linear layers)"], rows))
    return out


def clocks_and_power(page: PageRecords) -> list[str]:
    """SM clock and power, NVML, sampled during each measurement."""
    every = page.every
    out = []
    clocked = [r for r in every if r.get("sm_clock_mhz") or r.get("burst_sm_clock_mhz")]
    if clocked:
        rows = []
        for r in clocked:
            if r["system"] == "gemm-layer-skeleton":
                rows.append(clock_row(r, "burst_", "ceiling GEMM, burst (20 products, the ceiling's rate)",
                                      r["burst_gemm_tflops"]))
                rows.append(clock_row(r, "sustained_ceiling_", "ceiling GEMM, sustained 3 s",
                                      r["sustained_ceiling_gemm_tflops"]))
                rows.append(clock_row(r, "", "4 linear layers × all layers at T = 65 536, sustained 3 s",
                                      r["gemm_tflops"]))
            else:
                gemms = f" ({r['fp8_gemms']})" if r.get("fp8_gemms") else ""
                rows.append(clock_row(r, "", f"`{r['system']}`{gemms} on {r['workload']}: "
                                      f"{fmt_int(r['tokens_per_s'])} tok/s = {r['pct_of_ceiling']:.1f} % of ceiling"))
        out.append("### SM clock and power (NVML, sampled every 5–10 ms during each measurement; limit 700 W)\n\n"
                   + table(["run", "model", "measurement", "TFLOP/s", "mean SM clock MHz (max 1980)",
                            "mean power W", "samples with the power cap holding the clock"], rows))
    return out


def kernel_bandwidth(page: PageRecords) -> list[str]:
    """Kernel bandwidth of the latest run that measured it."""
    recs = page.recs
    out = []
    kb = [r for r in recs if r["system"] == "kernel-bandwidth"]
    if kb:
        run = max(kb, key=lambda r: r["date"])["commit"]
        kb = [r for r in kb if r["commit"] == run]
        copy = {r["model"]: r["tb_per_s"] for r in kb if r["kernel"] == "copy"}
        rows = []
        for (m, kern, w) in dict.fromkeys((r["model"], r["kernel"], r["width"]) for r in kb if r["kernel"] != "copy"):
            rs = [r for r in kb if (r["model"], r["kernel"], r["width"]) == (m, kern, w)]
            auto = next((r for r in rs if r["variant"] == "autotuned"), None)
            torch_ = next((r for r in rs if r["variant"] == "torch"), None)
            best = max((r for r in rs if r["variant"] not in ("autotuned", "torch")), key=lambda r: r["tb_per_s"])
            rows.append([f"`{run}`", short_model(m), f"`{kern}`", str(w),
                         f"{auto['tb_per_s']:.2f}" if auto else "—", f"{best['tb_per_s']:.2f} (`{best['variant'][:28]}`)",
                         f"{torch_['tb_per_s']:.2f}" if torch_ else "—", f"{copy.get(m, float('nan')):.2f}"])
        out.append("### Kernel bandwidth (TB/s, bytes read + written once; T = 65 536 rows, fp16)\n\n" + table(
            ["run", "model", "kernel", "width", "autotuned (the engine's launch)", "best configuration tried",
             "torch op it replaces", "device copy of the same bytes"], rows))
    return out


def fc1_epilogue(page: PageRecords) -> list[str]:
    """fc1 and its activation: cuBLAS + pointwise against one Triton kernel."""
    recs = page.recs
    out = []
    ge = [r for r in recs if r["system"] == "gemm-epilogue"]
    if ge:
        run = max(ge, key=lambda r: r["date"])["commit"]
        rows = []
        for (m, kern) in dict.fromkeys((r["model"], r["kernel"]) for r in ge if r["commit"] == run):
            v = {r["variant"]: r for r in ge if (r["commit"], r["model"], r["kernel"]) == (run, m, kern)}
            inductor = v.get("inductor-max-autotune")
            rows.append([f"`{run}`", short_model(m), kern, f"{v['cublas-alone']['ms']:.2f}",
                         f"{v['cublas+triton-pointwise']['ms']:.2f}", f"{v['fused-triton']['ms']:.2f}",
                         f"{v['fused-triton']['ms'] / v['cublas+triton-pointwise']['ms']:.2f}",
                         f"{inductor['ms']:.2f}" if inductor else "—"])
        out.append("### fc1 and its activation in one Triton kernel (ms per layer at T = 65 536, fp16)\n\n"
                   + table(["run", "model", "step", "cuBLAS GEMM alone", "cuBLAS + Triton activation (the engine)",
                            "one Triton kernel", "one kernel ÷ the engine's",
                            "Inductor max-autotune (fc1 + GELU compiled)"], rows))
    return out
