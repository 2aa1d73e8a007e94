"""The four PNGs: throughput by system, tokens/s by GPU count, host pipeline by cores, the
store's table growing (matplotlib, Agg backend, imported when a figure is drawn)."""

from __future__ import annotations

import math
from pathlib import Path

from benchmark_page.cells import k, short_model
from benchmark_page.labels import GOAL_HOST_CORES, GOAL_MODELS, GOAL_PCT, SUSTAINED_LABEL, SUSTAINED_LINES, SYSTEMS, WORKLOADS, WORKLOAD_LABEL
from benchmark_page.records import engine_series, host_curve_rows, latest_by_key, model_order, runs


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


def curve_commits(group: list[dict]) -> list[str]:
    """The commits a line of the cores figure shows, rows in time order: the newest (solid),
    and the newest before it that measured a curve — several core counts, not repeats of one
    (thin and dashed)."""
    commits = list(dict.fromkeys(r["commit"] for r in group))
    return [commits[-1]] + [c for c in commits[-2::-1]
                            if len({r["cores"] for r in group if r["commit"] == c}) > 1][:1]


def plot_host_cores(recs, out: Path):
    """Host-pipeline sequences/s against the cores it used (``--curve`` rows of a GPU machine),
    one line per (model, no-op devices, writers, token budget) from its newest commit (the commit before it dashed, where
    it measured a curve), with the goals; rows run under a profiler are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = host_curve_rows(recs)
    fig, ax = plt.subplots(figsize=(7.5, 5.2))
    lines: dict[tuple, list] = {}
    for r in sorted(rows, key=lambda r: (r["_t"], r["_i"])):
        lines.setdefault((r["model"], r.get("devices", 1), r.get("writers", 1),
                          r.get("budget") or 0), []).append(r)
    for i, ((model, devices, writers, budget), group) in enumerate(sorted(lines.items())):
        shown = curve_commits(group)
        for commit in shown:
            pts = {r["cores"]: r["sequences_per_s"] for r in group if r["commit"] == commit}
            xs = sorted(pts)
            newest = commit == shown[0]
            ax.plot(xs, [pts[x] for x in xs], "o-" if newest else "o--", ms=6 if newest else 4,
                    lw=1.5 if newest else 0.8, alpha=1 if newest else 0.55, color=f"C{i}",
                    label=f"{short_model(model)} dims, {devices} no-op devices"
                          + (f", {writers} writers" if writers != 1 else "")
                          + (f", budget {budget}" if budget else "") + f" ({commit})")
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
        ax.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_table_growth(rows, out: Path):
    """LMDB alone (``tools/bench_lmdb_values.py --segment``), one writer: values/s and the
    disk's bytes a value against the entries the table holds, one line per layout."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, size) = plt.subplots(1, 2, figsize=(10, 4.2))
    labels = {"values": "one database (the store's layout)",
              "generations": "a new database every {:.2f} M values (a proposal)"}
    for i, r in enumerate(rows):
        layout = r.get("layout", "values")
        label = labels.get(layout, layout).format((r.get("generation_size") or 0) / 1e6)
        label += f" ({r['commit']})"
        xs = [s["at"] / 1e6 for s in r["segments"]]
        rate.plot(xs, [s["puts_per_s"] / 1e3 for s in r["segments"]], "o-", color=f"C{i}", label=label)
        size.plot(xs, [s["disk_written_per_value"] for s in r["segments"]], "o-", color=f"C{i}",
                  label=label)
    if rows:
        vector = rows[0]["value_bytes"]
        size.axhline(vector, ls="--", lw=1, color="gray")
        size.annotate(f"the vector itself: {vector} B", (0, vector), xytext=(2, 3),
                      textcoords="offset points", fontsize=8, color="gray")
        per_txn = rows[0]["per_txn"]
        fig.suptitle(f"The store's table growing: LMDB alone, one writer, {vector}-byte values, "
                     f"{per_txn:,} a transaction, fsync each", fontsize=11, fontweight="bold")
    else:
        fig.suptitle("The store's table growing — not yet measured", fontsize=11, fontweight="bold")
    rate.set_ylabel("values / s (thousands), per segment")
    size.set_ylabel("bytes the disk wrote a value, per segment")
    for ax in (rate, size):
        ax.set_xlabel("entries in the table (millions)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.25)
    if rows:
        rate.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
