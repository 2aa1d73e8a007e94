"""The page's tables of issues 15 and 16: ``gpuengine merge``, replicas per GPU,
``gpuengine serve``, and their goals."""

from __future__ import annotations

from benchmark_page.cells import fmt_int, table
from benchmark_page.labels import GOAL_MERGE, GOAL_SERVE
from benchmark_page.records import PageRecords


def merge_flushing(r) -> str:
    """How a ``gpuengine-merge`` row's commits reached the disk, and what else ran."""
    what = ("never flushed (`--no-sync`)" if not r.get("sync", True)
            else "deferred flush" if r.get("flush") == "deferred" else "flush per commit")
    if r.get("read_ahead"):
        what += ", read-ahead"
    if r.get("profile"):
        what += ", under cProfile"
    return what


def merge(page: PageRecords) -> list[str]:
    """``gpuengine merge`` runs (none: no table)."""
    recs = page.recs
    out = []
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
    return out


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
             and "ratio_vs_single" in r and r.get("replicas_per_gpu", 1) == 1]  # the default R
    if serve:
        r = max(serve, key=lambda r: (r["_t"], r["_i"]))
        rows.append([f"`gpuengine serve`: {fmt_int(r['files'])} files × {r['sequences'] // r['files']} ≥ "
                     f"{100 * GOAL_SERVE:.0f} % of one file's rate (issue 16)",
                     f"{fmt_int(r['sequences_per_s'])} seq/s = {100 * r['ratio_vs_single']:.0f} % "
                     f"({r['model']}, `{r['commit']}`)",
                     "yes" if r["ratio_vs_single"] >= GOAL_SERVE else "**no**"])
    return rows


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
