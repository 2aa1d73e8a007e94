#!/usr/bin/env python3
"""Plots and markdown tables from the benchmark log ``docs/benchmarks/results.jsonl``.

    .venv/bin/pip install matplotlib          # dev-only tool: matplotlib is NOT a gpuengine dependency
    .venv/bin/python tools/plot_benchmarks.py             # writes the two PNGs
    .venv/bin/python tools/plot_benchmarks.py --markdown  # ... and prints the tables of docs/benchmarks.md

Writes
  docs/benchmarks/throughput.png    residue tokens/s by system for each (model, workload), from the
                                    latest record (by date) of each (model, workload, system); the
                                    gpuengine bars carry their % of the GEMM ceiling (burst), bars
                                    from an older run than the newest carry that run's commit;
                                    fp8 bars are the run default's GEMMs (tools/bench_fp8.py), and
                                    lines mark the ceilings of the bf16 and e4m3 GEMMs sustained
                                    for >= 3 s where a bench_fp8 run measured them
  docs/benchmarks/by_gpu_count.png  tokens/s against the number of GPUs, per model and system, for one
                                    workload (--gpu-workload), with an "ideal linear" line from the
                                    1-GPU point to 8 GPUs
  docs/benchmarks/host_cores.png    host-pipeline sequences/s against cores used (bench --curve rows
                                    of a GPU machine, not under a profiler), per model and no-op
                                    device count (newest commit; the one before dashed), with goals

Every number in docs/benchmarks.md comes from ``--markdown``; nothing there is typed by hand.
Only the standard library and matplotlib (Agg backend) are used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "benchmarks"

# system key -> (legend label, colour)
SYSTEMS = OrderedDict([
    ("gemm-ceiling", ("GEMM ceiling (bf16 GEMM rate ÷ FLOPs per residue)", "#a9a9a9")),
    ("gpuengine", ("gpuengine (packed runner, fp16; Triton kernels since 4ad83f1)", "#1f77b4")),
    ("gpuengine-e2e", ("gpuengine embed, FASTA → LMDB (tok/s over the embed phase)", "#6baed6")),
    ("gpuengine-fp8", ("gpuengine --precision fp8 (qkv, fc1, fc2 in e4m3)", "#17becf")),
    ("hf-sdpa-bf16", ("HF EsmModel, SDPA, bf16, padded", "#ff7f0e")),
    ("fair-esm-fp32", ("fair-esm fp32, 2048 tokens/batch (VirNucPro)", "#2ca02c")),
    ("padded-sdpa-bf16", ("DNABERT-S read plainly: padded, SDPA + ALiBi bias, bf16", "#9467bd")),
])
SUSTAINED_LINES = {"ceiling_bf16_sustained": (":", "#404040"), "ceiling_fp8_sustained": ("-.", "#17becf")}
SUSTAINED_LABEL = {"ceiling_bf16_sustained": "ceiling, bf16 GEMM sustained ≥ 3 s",
                   "ceiling_fp8_sustained": "ceiling, e4m3 GEMM sustained ≥ 3 s"}
WORKLOADS = ["virnucpro150", "virnucpro500", "uniprot", "dna150", "dna500"]
WORKLOAD_LABEL = {"virnucpro150": "150-bp reads (48–50 aa)", "virnucpro500": "500-bp chunks (164–166 aa)",
                  "uniprot": "UniProt-like (log-normal lengths)", "dna150": "150-bp reads",
                  "dna500": "500-bp chunks"}
GOAL_MODELS = {"esm2-3B"}  # the 75 % goal is stated for ESM-2 3B only
RUN_LABEL = {"04ebd69": "run 1 (synchronous runner)", "249a66f": "run 2 (two-thread pipeline)",
             "938da87": "run 3 (single-thread worker)", "967d20d": "DNABERT-S, predict 100k",
             "1f77b62": "run 4 (in-place RoPE)", "4ad83f1": "run 5 (Triton layer kernels)",
             "3f8d856": "predict 1M reads", "f8cdb51": "run 6 (tuned kernels, host pipeline)",
             "907119d": "DNABERT-S, sync-free pooling",
             "e8f4e7a": "kernel bandwidth, DNABERT-S timeline", "32d0187": "DNABERT-S flex block variants, 3B",
             "70fbab3": "run 7 (64-row flex blocks, faster host path)",
             "6f96de3": "fused fc1 + activation (variant)",
             "cf282ff": "FlexAttention for ESM-2 (variant)",
             "1faff81": "run 8 (input reader process; 1.2 M-residue runs)",
             "f63df5b": "host-pipeline settings; clocks and power",
             "6655d34": "run 9 (group commit; clocks and power)",
             "4b624d4": "0.2 ms switch interval (backed out); predict 200k",
             "34e63de": "DNA host pipeline; predict 500k",
             "a380bbd": "merge 1 M vectors", "64d0a44": "merge 1 M vectors, verified",
             "7b198c9": "FP8 GEMM choices (bench_fp8)",
             "5b4017b": "renovated main (issue 14)",
             "c9772e1": "several input processes (VM A/B)", "6f054af": "shard input pass (VM)",
             "03ef061": "input processes by tokenizer cost (VM A/B)",
             "84965ee": "predict 1 M fp8; host against cores; shard input pass",
             "a28865b": "replicas per GPU R = 1, 2, 4",
             "a19e72e": "serve smoke test (CPU, --quick)",
             "e23f4ea": "merge before merge-fast; fp8 default on UniProt; host under py-spy",
             "59414a5": "merge-fast on the VM (after)", "d00f484": "merge on the VM (main, before)",
             "5da4772": "host per chunk, deferred merge flush, predict frames in input processes; serve",
             "58d11b2": "merge read-ahead by default"}
GOAL_DNA_PCT = 60.0       # issue 4: DNABERT-S at 60 % of its GEMM ceiling
GOAL_PCT = 75.0            # docs/performance: 75 % of the GEMM ceiling for ESM-2 3B
GOAL_HF = 1.9              # ≥ 1.9× HF on every workload
GOAL_HF_FIRST = 1.5        # what the first issue expected
GOAL_HOST = 50_000         # host pipeline, sequences/s
GOAL_FP8_FP16 = 1.35       # issue 17: fp8 ≥ 1.35× gpuengine fp16 (same run)
GOAL_FP8_HF = 2.0          # issue 17: fp8 ≥ 2.0× HF SDPA bf16 (same run)
GOAL_SUSTAINED = 90.0      # issue 17: fp16 ≥ 90 % of the sustained bf16 GEMM ceiling
GOAL_PREDICT_FP8_S = 300   # issue 17: predict 1 M reads at fp8, cold, ≤ 300 s
GOAL_MERGE = 200_000       # issue 15: merge 1 M 650M vectors from 8 shards, vectors/s (GPU machine's disk)
GOAL_SERVE = 0.8           # issue 16: 2 000 files × 100 through serve ≥ 80 % of one file's rate
DEFAULT_FP8_GEMMS = "qkv,fc1,fc2"
"""gpuengine.models.fp8.DEFAULT_FP8.describe() (this tool imports nothing of gpuengine); rows
of tools/bench_fp8.py from before the default existed are matched by their GEMMs."""


# -- data ---------------------------------------------------------------------------------------

def load(path: Path) -> list[dict]:
    recs = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            r = json.loads(line)
            r["_t"] = dt.datetime.fromisoformat(r["date"])
            r["_i"] = i
            r["_fp8_bench"] = "bench_fp8" in r.get("command", "")
            if r.get("system") == "gpuengine-e2e" and r.get("precision") == "fp8":
                r["system"] = "gpuengine-fp8-e2e"  # bench_fp8's embed run: not the fp16 series
            if r.get("system") == "gpuengine-fp8" and not is_default_fp8(r):
                r["system"] = "gpuengine-fp8-choice"  # other GEMM choices: the FP8 tables only
            recs.append(r)
    return recs


def engine_series(recs) -> list[dict]:
    """The records of the main tables and the figure: tools/bench_fp8.py's runs have their own
    tables (their fp16, HF and ceilings compare within the run); the figure takes from them
    only the default fp8 and the ceilings (for the sustained lines)."""
    return [r for r in recs if not r["_fp8_bench"]
            or r["system"] in ("gpuengine-fp8", "gemm-ceiling")]


def is_default_fp8(r) -> bool:
    return bool(r.get("fp8_default")) or r.get("fp8_gemms") == DEFAULT_FP8_GEMMS


def model_order(recs):
    def size(m):
        n = re.search(r"(\d+)([MB])$", m)
        return int(n.group(1)) * (1000 if n.group(2) == "B" else 1) if n else 0
    return sorted({r["model"] for r in recs}, key=size, reverse=True)


def runs(recs):
    """Commits in the order of their first record."""
    return list(OrderedDict((r["commit"], None) for r in sorted(recs, key=lambda r: (r["_t"], r["_i"]))))


def latest(recs, **match):
    """Latest record (by date, then by line) with the given field values, or None."""
    hits = [r for r in recs if all(r.get(k) == v for k, v in match.items())]
    return max(hits, key=lambda r: (r["_t"], r["_i"])) if hits else None


def latest_by_key(recs):
    out = {}
    for r in recs:
        if r.get("tokens_per_s") is None:
            continue
        key = (r["model"], r["workload"], r["system"], r.get("n_gpus", 1))
        if key not in out or (r["_t"], r["_i"]) > (out[key]["_t"], out[key]["_i"]):
            out[key] = r
    return out


def short_model(m):
    return m.replace("esm2-", "ESM-2 ")


def k(x, digits=1):
    return f"{x / 1000:,.{digits}f} k"


def fmt_int(x):
    return f"{x:,.0f}".replace(",", " ")


# -- plots --------------------------------------------------------------------------------------

def plot_throughput(recs, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    best = latest_by_key([r for r in engine_series(recs) if r.get("n_gpus", 1) == 1])
    models = [m for m in model_order(recs)
              if any(k_[0] == m and k_[1] in WORKLOADS and k_[2] in SYSTEMS for k_ in best)]
    # the newest run with a bar (not a CPU-only tool's, nor a series this figure does not draw)
    newest = runs([r for k_, r in best.items() if k_[0] in models and k_[1] in WORKLOADS
                   and k_[2] in SYSTEMS])[-1]
    fig, axes = plt.subplots(len(models), 1, figsize=(13, 5.4 * len(models)), squeeze=False)
    width = 0.16
    older = set()
    for ax, model in zip(axes[:, 0], models):
        systems = [s for s in SYSTEMS if any((model, w, s, 1) in best for w in WORKLOADS)]
        wls = [w for w in WORKLOADS if any((model, w, s, 1) in best for s in systems)]
        ymax = max([best[(model, w, s, 1)]["tokens_per_s"] for w in wls for s in systems if (model, w, s, 1) in best]
                   + [best[(model, w, "gemm-ceiling", 1)].get(key) or 0 for w in wls for key in SUSTAINED_LINES
                      if (model, w, "gemm-ceiling", 1) in best])
        for wi, wl in enumerate(wls):
            ceil = best.get((model, wl, "gemm-ceiling", 1))
            if ceil and model in GOAL_MODELS:
                x0, x1 = wi - 2.6 * width, wi + 2.6 * width
                ax.plot([x0, x1], [GOAL_PCT / 100 * ceil["tokens_per_s"]] * 2, ls="--", color="#d62728", lw=1.2)
            for key, (style, colour) in SUSTAINED_LINES.items():  # tools/bench_fp8.py's runs
                if ceil and ceil.get(key):
                    x0, x1 = wi - 2.6 * width, wi + 2.6 * width
                    ax.plot([x0, x1], [ceil[key]] * 2, ls=style, color=colour, lw=1.4)
                    ax.text(x1, ceil[key], f" {k(ceil[key], 0)}", va="center", fontsize=7, color=colour)
            for si, system in enumerate(systems):
                x = wi + (si - (len(systems) - 1) / 2) * width
                r = best.get((model, wl, system, 1))
                if r is None:
                    ax.text(x, ymax * 0.012, "not\nrun", ha="center", va="bottom", fontsize=7, color="#777")
                    continue
                v = r["tokens_per_s"]
                ax.bar(x, v, width * 0.92, color=SYSTEMS[system][1], edgecolor="black", lw=0.5)
                label = k(v, 1 if v < 100_000 else 0)
                if r["commit"] != newest:
                    label += f"\n({r['commit']})"
                    older.add(r["commit"])
                if system in ("gpuengine", "gpuengine-e2e", "gpuengine-fp8") and r.get("pct_of_ceiling"):
                    ax.text(x, v * 0.5, f"{r['pct_of_ceiling']:.0f} %\nof\nceiling", ha="center", va="center",
                            fontsize=8.5, color="white", fontweight="bold")
                ax.text(x, v + ymax * 0.012, label, ha="center", va="bottom", fontsize=7.5)
        ax.set_xticks(range(len(wls)))
        means = {w: next((best[(model, w, s, 1)].get("mean_residues") for s in systems
                          if (model, w, s, 1) in best), None) for w in wls}
        ax.set_xticklabels([f"{w}\n{WORKLOAD_LABEL.get(w, '')}" + (f", mean {means[w]:.0f} aa" if means[w] else "")
                            for w in wls], fontsize=9.5)
        ax.set_ylim(0, ymax * 1.17)
        ax.set_ylabel("model tokens / s (CLS, SEP included)" if model == "dnabert-s" else "residue tokens / s")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y / 1000:,.0f} k"))
        ax.set_title(f"{short_model(model)}", fontsize=12, loc="left", fontweight="bold")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles = [Patch(facecolor=c, edgecolor="black", lw=0.5, label=lab) for lab, c in SYSTEMS.values()]
    handles.append(matplotlib.lines.Line2D([], [], ls="--", color="#d62728",
                                           label=f"goal for ESM-2 3B: {GOAL_PCT:.0f} % of the ceiling"))
    handles += [matplotlib.lines.Line2D([], [], ls=style, color=colour, label=SUSTAINED_LABEL[key])
                for key, (style, colour) in SUSTAINED_LINES.items()]
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=9, bbox_to_anchor=(0.5, 0.945), frameon=False)
    note = f"latest record per (model, workload, system); bars without a commit are from {newest}"
    if older:
        note += "; older runs named on their bars"
    gpu = next(r["gpu"] for r in best.values() if r["commit"] == newest)
    fig.suptitle(f"Embedding throughput on one {gpu} (random weights, real shapes)\n{note}",
                 fontsize=11.5, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.925))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_by_gpu_count(recs, out: Path, workload: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = latest_by_key(engine_series(recs))
    counts = sorted({r.get("n_gpus", 1) for r in recs})
    models = [m for m in model_order(recs)  # a model with a drawn series (not bench_replicas' 8M alone)
              if any(k_[0] == m and k_[1] == workload and k_[2] in SYSTEMS for k_ in best)]
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 6.2), squeeze=False)
    xs = [1, 2, 4, 8]
    newest = runs([r for k_, r in best.items() if k_[0] in models and k_[1] == workload
                   and k_[2] in SYSTEMS])[-1]  # the newest run this figure draws
    for ax, model in zip(axes[0], models):
        labels = []
        for system, (label, colour) in SYSTEMS.items():
            pts = sorted((n, best[(model, workload, system, n)]) for n in counts
                         if (model, workload, system, n) in best)
            if not pts:
                continue
            one = dict(pts).get(1)
            if one:
                v = one["tokens_per_s"]
                ax.plot(xs, [v * n for n in xs], ls="--", color=colour, lw=1.2, alpha=0.8)
                text = k(v, 1 if v < 100_000 else 0) + ("" if one["commit"] == newest else f" ({one['commit']})")
                labels.append([v, text, colour])
                if system == "gpuengine":
                    ideal = f"{8 * v / 1e6:.2f} M" if 8 * v >= 1e6 else k(8 * v, 0)
                    ax.annotate(f"ideal at 8: {ideal}", (8, 8 * v), xytext=(-6, 8), textcoords="offset points",
                                ha="right", fontsize=8, color=colour)
            ax.plot([p[0] for p in pts], [p[1]["tokens_per_s"] for p in pts], "o-", color=colour, ms=7, label=label,
                    mec="black", mew=0.5)
        # value labels left of the 1-GPU points, spread apart (in decades) where they would overlap
        labels.sort()
        ys = [math.log10(v) for v, _, _ in labels]
        for i in range(1, len(ys)):
            ys[i] = max(ys[i], ys[i - 1] + 0.075)
        for (v, text, colour), y in zip(labels, ys):
            ax.annotate(text, (1, v), xytext=(0.9, 10 ** y), textcoords="data", ha="right", va="center", fontsize=8.5,
                        color=colour, fontweight="bold",
                        arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.6, "shrinkA": 0, "shrinkB": 4})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlim(0.42, 10)
        ax.set_xlabel("GPUs (H200, one host)")
        ax.set_ylabel("model tokens / s (CLS, SEP included)" if model == "dnabert-s" else "residue tokens / s")
        fmt = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y / 1e6:g} M" if y >= 1e6 else f"{y / 1000:g} k")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 5)))
        ax.yaxis.set_minor_formatter(fmt)
        ax.tick_params(axis="y", which="minor", labelsize=8)
        ax.grid(which="both", alpha=0.25)
        ax.set_title(f"{short_model(model)}, {workload}: {WORKLOAD_LABEL.get(workload, '')}",
                     fontsize=11, fontweight="bold")
    axes[0][0].plot([], [], ls="--", color="gray", label="ideal linear scaling from the 1-GPU point")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=9, frameon=False)
    missing = [n for n in (2, 4, 8) if n not in counts]
    title = "Throughput against GPU count"
    if missing:
        title += f" — only 1 GPU measured so far; {'/'.join(map(str, missing))}-GPU runs are not yet measured"
    fig.suptitle(title + f"\n(points: measured, latest run, {newest} where no commit is named; dashed: ideal linear "
                 "extrapolation, not a measurement)",
                 fontsize=11.5)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


# -- markdown -----------------------------------------------------------------------------------

def host_setting(r) -> str:
    """How a host-pipeline record differs from the defaults (store on the local disk)."""
    parts = []
    if r.get("workdir", "").startswith("/dev/shm"):
        parts.append("store on tmpfs")
    if r.get("switch_interval_ms") not in (None, 5.0):
        parts.append(f"switch interval {r['switch_interval_ms']:.2g} ms")
    if r.get("input_process") not in (None, "auto"):
        parts.append(f"GPUENGINE_INPUT_PROCESS={r['input_process']}")
    if r.get("gpu", "").startswith("none"):
        cores = re.search(r"(\d+) cores", r["gpu"])
        parts.append(f"CPU-only machine, {cores.group(1) if cores else '?'} cores")
    if r.get("devices", 1) != 1:
        parts.append(f"{r['devices']} no-op devices")
    if r.get("cores") is not None and not r.get("gpu", "").startswith("none"):
        parts.append(f"{r['cores']} cores, {r.get('input_processes', '?')} input processes")
    if r.get("profiled"):
        parts.append(f"under {r['profiled']} (sampling slows it)")
    return ", ".join(parts) or "default"


def host_curve_rows(recs) -> list[dict]:
    """Host-pipeline rows of a GPU machine that name their cores (``--curve``/``--cores``), not
    run under a profiler: what the curve and issue 16's goals are judged on."""
    return [r for r in recs if r["system"] == "gpuengine-host" and r.get("cores")
            and not r.get("gpu", "").startswith("none") and not r.get("profiled")]


GOAL_HOST_CORES = {"dnabert-s": 220_000, "esm2-650M": 60_000}
"""Issue 16's host-pipeline goals on the device machine's 16 cores (sequences/s)."""


def plot_host_cores(recs, out: Path):
    """Host-pipeline sequences/s against the cores it used (``--curve`` rows of a GPU machine),
    one line per (model, no-op devices) from its newest commit (the commit before it dashed, where
    it measured a curve), with the goals; rows run under a profiler are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = host_curve_rows(recs)
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    lines: dict[tuple, list] = {}
    for r in sorted(rows, key=lambda r: (r["_t"], r["_i"])):
        lines.setdefault((r["model"], r.get("devices", 1)), []).append(r)
    for i, ((model, devices), group) in enumerate(sorted(lines.items())):
        commits = list(dict.fromkeys(r["commit"] for r in group))
        # the newest commit solid; the one before it (where it measured a curve) thin and dashed
        shown = [commits[-1]] + [c for c in commits[-2::-1]
                                 if sum(r["commit"] == c for r in group) > 1][:1]
        for commit in shown:
            pts = {r["cores"]: r["sequences_per_s"] for r in group if r["commit"] == commit}
            xs = sorted(pts)
            newest = commit == commits[-1]
            ax.plot(xs, [pts[x] for x in xs], "o-" if newest else "o--", ms=6 if newest else 4,
                    lw=1.5 if newest else 0.8, alpha=1 if newest else 0.55, color=f"C{i}",
                    label=f"{short_model(model)} dims, {devices} no-op devices ({commit})")
    for model, goal in GOAL_HOST_CORES.items():
        ax.axhline(goal, ls="--", lw=1, color="gray")
        ax.annotate(f"goal {short_model(model)}: {goal // 1000} k/s at 16 cores", (2, goal),
                    xytext=(2, 3), textcoords="offset points", fontsize=8, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xticks([2, 4, 8, 16])
    ax.set_xticklabels(["2", "4", "8", "16"])
    ax.set_xlabel("cores used (input processes: as the rows say)")
    ax.set_ylabel("sequences / s (host pipeline, GPU step a no-op)")
    ax.grid(alpha=0.25)
    ax.set_title("Host pipeline against cores" + ("" if rows else " — not yet measured"),
                 fontsize=11, fontweight="bold")
    if rows:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def clock_row(r, prefix, what, tflops=None):
    return [f"`{r['commit']}`", short_model(r["model"]), what, f"{tflops:.0f}" if tflops else "—",
            str(r.get(prefix + "sm_clock_mhz", "—")),
            # NVML's power reading averages over about a second: meaningless for a 0.1 s burst
            "—" if prefix == "burst_" else f"{r.get(prefix + 'power_w', float('nan')):.0f}",
            f"{100 * r.get(prefix + 'power_capped', 0):.0f} %"]


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(every, profile: list[Path] | None) -> str:
    recs = [r for r in every if not r["_fp8_bench"]]  # bench_fp8's runs: fp8_tables
    order = runs(recs)
    # the latest run that timed ESM-2 (DNABERT-S and predict runs have their own sections)
    newest = latest([r for r in recs if r["model"].startswith("esm2")], system="gpuengine")["commit"]
    out = []
    models = [m for m in model_order(recs) if m.startswith("esm2")]  # ESM-2 sections

    def one(commit, model, wl, system, **kw):
        return latest(recs, commit=commit, model=model, workload=wl, system=system, n_gpus=1, **kw)

    # runs overview
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

    # main table: per (model, workload) its latest gpuengine run, with that run's ceiling and HF
    def latest_run(m, wl, system="gpuengine"):
        """The latest run of ``system``; for ``gpuengine``, the latest that also timed HF (the
        rows compare the two from one run)."""
        if system == "gpuengine":
            with_hf = {r["commit"] for r in recs if r["system"] == "hf-sdpa-bf16"
                       and r.get("model") == m and r.get("workload") == wl}
            cands = [r for r in recs if r["system"] == system and r.get("model") == m
                     and r.get("workload") == wl and r.get("n_gpus", 1) == 1 and r["commit"] in with_hf]
            return max(cands, key=lambda r: r["date"])["commit"] if cands else None
        g = latest(recs, model=m, workload=wl, system=system, n_gpus=1)
        return g["commit"] if g else None

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

    # e2e details: latest per (model, workload)
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

    # fair-esm
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

    # host pipeline: every record (a run may measure settings side by side)
    rows = []
    host_models = models + ["dnabert-s"]
    for c_ in order:
        for m in host_models:
            for wl in WORKLOADS:
                for hp in (r for r in recs if (r["commit"], r["model"], r["workload"], r["system"])
                           == (c_, m, wl, "gpuengine-host")):
                    rows.append([f"`{c_}`", short_model(m), wl, host_setting(hp), fmt_int(hp["sequences"]),
                                 f"{hp['wall_s']:.1f}", f"{hp['embed_s']:.1f}",
                                 f"**{fmt_int(hp['sequences_per_s'])}**", fmt_int(hp["tokens_per_s"]),
                                 f"{hp['sequences_per_s'] / GOAL_HOST * 100:.0f} %"])
    out.append("### Host pipeline (GPU step replaced by a no-op)\n\n" + table(
        ["run", "model (dim of the zero vectors)", "workload", "setting", "sequences", "wall s", "pipeline s", "sequences/s",
         "residues/s", f"of the {GOAL_HOST // 1000} k seq/s goal"], rows))

    # cosine
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

    # DNABERT-S
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

    # predict
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

    # merge
    rows = []
    for r in recs:
        if r["system"] == "gpuengine-merge":
            st = r.get("stage_seconds", {})
            by = {key.split(":")[-1].strip(): v for key, v in st.items()}
            machine = "CPU only" if r["gpu"].startswith("none") else r["gpu"]
            rows.append([f"`{r['commit']}`", f"{machine}, {r['cpus']} cores, {r['filesystem']}",
                         fmt_int(r["vectors"]), str(r["shards"]), f"**{fmt_int(r['vectors_per_s'])}**",
                         f"{r['mb_per_s']:.0f}", f"{r['wall_s']:.1f}",
                         f"{by.get('checking ids of table default', 0):.1f}",
                         f"{by.get('merging vectors', 0):.1f}", f"{by.get('merging ids', 0):.1f}",
                         fmt_int(r["verify_vectors_per_s"]) if r.get("verify_vectors_per_s") else "—",
                         merge_flushing(r)])
    if rows:
        out.append("### `gpuengine merge` (ESM-2 650M mean vectors, 1280 × fp16, shards in the page "
                   "cache)\n\n"
                   + table(["run", "machine", "vectors", "shards", "vectors/s", "MB/s", "wall s",
                            "id check s", "vectors s", "ids s", "verify vectors/s", "commits"], rows))

    out.extend(scale_sections(recs))

    # history
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

    # run 1 eager vs compiled
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

    # budget sweeps
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

    # variants
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

    # GEMM skeleton
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

    # clocks and power (NVML, sampled during each measurement)
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

    # kernel bandwidth
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

    # fc1 with its activation: cuBLAS + pointwise against one Triton kernel
    ge = [r for r in recs if r["system"] == "gemm-epilogue"]
    if ge:
        run = max(ge, key=lambda r: r["date"])["commit"]
        rows = []
        for (m, kern) in dict.fromkeys((r["model"], r["kernel"]) for r in ge if r["commit"] == run):
            v = {r["variant"]: r for r in ge if (r["commit"], r["model"], r["kernel"]) == (run, m, kern)}
            rows.append([f"`{run}`", short_model(m), kern, f"{v['cublas-alone']['ms']:.2f}",
                         f"{v['cublas+triton-pointwise']['ms']:.2f}", f"{v['fused-triton']['ms']:.2f}",
                         f"{v['fused-triton']['ms'] / v['cublas+triton-pointwise']['ms']:.2f}"])
        out.append("### fc1 and its activation in one Triton kernel (ms per layer at T = 65 536, fp16)\n\n"
                   + table(["run", "model", "step", "cuBLAS GEMM alone", "cuBLAS + Triton activation (the engine)",
                            "one Triton kernel", "one kernel ÷ the engine's"], rows))

    # goals
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
    for m, goal in GOAL_HOST_CORES.items():
        h = latest(curve, model=m)
        if h:
            earlier = [r for r in sorted(curve, key=lambda r: (r["_t"], r["_i"]), reverse=True)
                       if r["model"] == m and r is not h and r.get("devices") == h.get("devices")]
            rows.append([f"host pipeline, {short_model(m)} dims, 16 cores of the GPU machine: ≥ {goal // 1000} k "
                         "sequences/s (issue 16)",
                         f"{fmt_int(h['sequences_per_s'])} seq/s ({h.get('devices', 1)} no-op devices, "
                         f"{h.get('input_processes', '?')} input processes, `{h['commit']}`)"
                         + ("; earlier " + ", ".join(f"{fmt_int(r['sequences_per_s'])} (`{r['commit']}`)"
                                                     for r in earlier) if earlier else ""),
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
    out.extend(fp8_tables(every))

    for path in profile or []:
        out.append(f"### Where the time goes: `{path.name}`\n\n" + profile_summary(path))
    return "\n\n".join(out) + "\n"


def merge_flushing(r) -> str:
    """How a ``gpuengine-merge`` row's commits reached the disk, and what else ran."""
    what = ("never flushed (`--no-sync`)" if not r.get("sync", True)
            else "deferred flush" if r.get("flush") == "deferred" else "flush per commit")
    if r.get("read_ahead"):
        what += ", read-ahead"
    if r.get("profile"):
        what += ", under cProfile"
    return what


def scale_goals(recs) -> list[list[str]]:
    """Issue 15's merge goal (the latest commit's merges on a GPU machine's disk with their
    commits flushed and no profiler: their median) and issue 16's serve goal (the latest
    2 000-file run against one file)."""
    rows = []
    merges = [r for r in recs if r["system"] == "gpuengine-merge" and not r["gpu"].startswith("none")
              and r.get("sync", True) and not r.get("profile")]
    if merges:
        last = max(merges, key=lambda r: (r["_t"], r["_i"]))["commit"]
        rates = [r["vectors_per_s"] for r in merges if r["commit"] == last]
        median = sorted(rates)[len(rates) // 2] if len(rates) % 2 else \
            sum(sorted(rates)[len(rates) // 2 - 1:len(rates) // 2 + 1]) / 2
        rows.append([f"`gpuengine merge`, 1 M ESM-2 650M fp16 vectors from 8 shards, GPU machine's disk: "
                     f"≥ {GOAL_MERGE // 1000} k vectors/s (issue 15)",
                     ", ".join(fmt_int(x) for x in rates) + f" vectors/s (`{last}`"
                     + (f", median {fmt_int(median)})" if len(rates) > 1 else ")"),
                     "yes" if median >= GOAL_MERGE else
                     f"**no** ({100 * (1 - median / GOAL_MERGE):.0f} % short)"])
    serve = [r for r in recs if r["system"] == "gpuengine-serve" and not r.get("quick")
             and "ratio_vs_single" in r]
    if serve:
        r = max(serve, key=lambda r: (r["_t"], r["_i"]))
        rows.append([f"`gpuengine serve`: {fmt_int(r['files'])} files × {r['sequences'] // r['files']} ≥ "
                     f"{100 * GOAL_SERVE:.0f} % of one file's rate (issue 16)",
                     f"{fmt_int(r['sequences_per_s'])} seq/s = {100 * r['ratio_vs_single']:.0f} % "
                     f"({r['model']}, `{r['commit']}`)",
                     "yes" if r["ratio_vs_single"] >= GOAL_SERVE else "**no**"])
    return rows


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


def latest_per_workload(rows) -> list[dict]:
    """The latest row of each workload, in the order of WORKLOADS."""
    by = {}
    for r in rows:
        if r["workload"] not in by or (r["_t"], r["_i"]) > (by[r["workload"]]["_t"], by[r["workload"]]["_i"]):
            by[r["workload"]] = r
    return [by[wl] for wl in WORKLOADS if wl in by]


def fp8_run(recs, commit) -> list[dict]:
    return [r for r in recs if r["commit"] == commit and "bench_fp8" in r.get("command", "")]


def run_peer(run, workload, system):
    return next((g for g in run if g["system"] == system and g["workload"] == workload), None)


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


def scale_sections(recs) -> list[str]:
    """Issue 16's tables, always present (``not measured yet`` until device rows land):
    ``--replicas-per-gpu`` R = 1, 2, 4 (``tools/bench_replicas.py``) and many small files
    through ``gpuengine serve`` against one large file (``tools/bench_serve.py``); rows of the
    tools' ``--quick`` CPU mode are left out."""
    real = [r for r in recs if not r.get("quick")]
    out = []
    rows = []
    reps = [r for r in real if "replicas_per_gpu" in r
            and r["system"] in ("gpuengine-replicas", "gpuengine-replicas-e2e")]
    for key in sorted({(r["commit"], r["model"], r["system"]) for r in reps}):
        commit, model, system = key
        by_r = {r["replicas_per_gpu"]: r for r in reps if (r["commit"], r["model"], r["system"]) == key}
        cells = [f"{fmt_int(by_r[n]['sequences_per_s'])} ({by_r[n]['speedup_vs_r1']:.2f}×)"
                 if n in by_r else "—" for n in (1, 2, 4)]
        rows.append([f"`{commit}`", model, by_r[min(by_r)]["workload"], system, *cells])
    body = (table(["run", "model", "workload", "system", "R = 1 seq/s", "R = 2", "R = 4"], rows)
            if rows else "not measured yet (`tools/bench_replicas.py` on the device machine)")
    out.append("### Replicas per GPU (`--replicas-per-gpu R`, one GPU; × R = 1)\n\n" + body)
    rows = []
    serve = [r for r in real if r["system"] == "gpuengine-serve"]
    for r in sorted(serve, key=lambda r: (r["date"], r["files"])):
        rows.append([f"`{r['commit']}`", r["model"], r["workload"], str(r.get("replicas_per_gpu", 1)),
                     f"**{fmt_int(r['sequences_per_s'])}**",
                     f"{100 * r['ratio_vs_single']:.0f} %" if "ratio_vs_single" in r else "—",
                     f"{r['file_latency_s']['median']:.2f}", f"{r['file_latency_s']['p90']:.2f}",
                     f"{r['claim_to_done_s']['median']:.2f}",
                     str(r.get("engine_runs", "—"))])
    body = (table(["run", "model", "workload", "R", "seq/s", "of one file", "median latency s",
                   "p90 latency s", "median claim → done s", "engine runs"], rows)
            if rows else "not measured on a GPU yet (`tools/bench_serve.py` on the device machine)")
    out.append("### Many small files through `gpuengine serve` (goal: ≥ 80 % of one file)\n\n"
               + body)
    return out


FAMILIES = [
    ("GEMMs (cuBLAS nvjet, fused bias or residual): QKV/out projection and FFN", r"^nvjet"),
    ("fused rotary + QKV split (Triton, `…add_cat_mul_neg_split_unbind…`)", r"fused__to_copy_add_cat_mul_neg_split"),
    ("RoPE in place on the QKV projection (gpuengine Triton `_rope_qk_inplace`)", r"^_rope_qk_inplace"),
    ("FlashAttention varlen forward", r"flash_fwd"),
    ("FlexAttention (document mask + ALiBi, compiled)", r"flex_attention"),
    ("`v.contiguous()` copy out of the fused QKV output (Triton, `fused_clone_unbind_view`)", r"fused_clone_unbind_view"),
    ("GELU / GLU gate (gpuengine Triton `_gelu`)", r"^_gelu$"),
    ("GELU (inductor Triton)", r"fused_gelu"),
    ("LayerNorm, residual + LayerNorm (gpuengine Triton `_layer_norm`)", r"^_layer_norm$"),
    ("LayerNorms (inductor Triton, one fused with the residual add)", r"layer_norm"),
    ("residual add (Triton)", r"fused_add_\d"),
]


def profile_summary(path: Path) -> str:
    """Kernel rows (Self CPU 0, Self CUDA > 0) of a torch.profiler table, grouped into families."""
    total = None
    kernels = []
    for line in path.read_text().splitlines():
        m = re.match(r"Self CUDA time total:\s*([\d.]+)(ms|s)\b", line)
        if m:
            total = float(m.group(1)) * (1000 if m.group(2) == "s" else 1)
        cols = re.split(r"\s{2,}", line.strip())
        if len(cols) == 11 and cols[2] == "0.000us" and cols[6].endswith("ms"):
            kernels.append((cols[0], float(cols[6][:-2]), float(cols[7].rstrip("%")), int(cols[10])))
    rows, used = [], set()
    for label, pat in FAMILIES:
        hit = [kn for kn in kernels if re.search(pat, kn[0]) and kn[0] not in used]
        if not hit:
            continue
        used.update(kn[0] for kn in hit)
        rows.append([label, len(hit), f"{sum(kn[1] for kn in hit):.1f}", f"**{sum(kn[2] for kn in hit):.1f} %**",
                     sum(kn[3] for kn in hit)])
    rest = [kn for kn in kernels if kn[0] not in used]
    for kn in rest:
        rows.append([f"`{kn[0]}`", 1, f"{kn[1]:.1f}", f"{kn[2]:.1f} %", kn[3]])
    listed = sum(kn[1] for kn in kernels)
    rows.append(["all kernels listed", len(kernels), f"{listed:.1f}",
                 f"{100 * listed / total:.1f} %" if total else "—", sum(kn[3] for kn in kernels)])
    return (table(["kernel family", "kernels", "GPU ms", "share of GPU time", "launches"], rows)
            + f"\n\nSelf CUDA time total: {total} ms (`{path.name}`).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=BENCH / "results.jsonl")
    ap.add_argument("--out-dir", type=Path, default=BENCH)
    ap.add_argument("--gpu-workload", default="virnucpro150", help="workload of the by-GPU-count plot")
    ap.add_argument("--profile", type=Path, nargs="*",
                    default=sorted(BENCH.glob("profile-*.txt"), key=lambda p: p.stat().st_mtime)[-2:],
                    help="kernel tables to summarise (default: the two newest profile-*.txt)")
    ap.add_argument("--markdown", action="store_true", help="print the tables of docs/benchmarks.md")
    args = ap.parse_args()
    recs = load(args.results)
    plot_throughput(recs, args.out_dir / "throughput.png")
    plot_by_gpu_count(recs, args.out_dir / "by_gpu_count.png", args.gpu_workload)
    plot_host_cores(recs, args.out_dir / "host_cores.png")
    print(f"wrote {args.out_dir / 'throughput.png'}, {args.out_dir / 'by_gpu_count.png'} and "
          f"{args.out_dir / 'host_cores.png'}", flush=True)
    if args.markdown:
        print(markdown(recs, args.profile))


if __name__ == "__main__":
    main()
