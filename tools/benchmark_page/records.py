"""The benchmark log's rows: loading them, and choosing the ones a figure or table shows."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from benchmark_page.labels import DEFAULT_FP8_GEMMS, WORKLOADS


PROFILE_RUN = "PROFILE RUN"  # in a row's note: timed under a profiler, kept for its profile file only


def load(path: Path) -> list[dict]:
    """The log's rows, less those marked PROFILE RUN (their timings include the sampler's
    overhead: never a result, so no table or figure may pick them) and those of benchmarks
    that run no model (``tools/bench_lmdb_values.py``: LMDB alone, quoted in the text)."""
    recs = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            r = json.loads(line)
            if PROFILE_RUN in r.get("note", "") or "model" not in r:
                continue
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


def host_setting(r) -> str:
    """How a host-pipeline record differs from the defaults (store on the local disk)."""
    parts = []
    if r.get("workdir", "").startswith("/dev/shm"):
        parts.append("store on tmpfs")
    if r.get("switch_interval_ms") not in (None, 5.0):
        parts.append(f"switch interval {r['switch_interval_ms']:.2g} ms")
    if r.get("input_process") not in (None, "auto"):
        parts.append(f"GPUENGINE_INPUT_PROCESS={r['input_process']}")
    if r.get("writer_process") not in (None, "auto"):
        what = "writer thread" if r["writer_process"] == "0" else "writer process"
        parts.append(f"{what} (GPUENGINE_WRITER_PROCESS={r['writer_process']})")
    if r.get("gpu", "").startswith("none"):
        cores = re.search(r"(\d+) cores", r["gpu"])
        parts.append(f"CPU-only machine, {cores.group(1) if cores else '?'} cores")
    if r.get("devices", 1) != 1:
        parts.append(f"{r['devices']} no-op devices")
    if r.get("cores") is not None and not r.get("gpu", "").startswith("none"):
        parts.append(f"{r['cores']} cores, {r.get('input_processes', '?')} input processes")
    if r.get("writers", 1) != 1:
        parts.append(f"{r['writers']} writers")
    if r.get("budget") is not None:
        parts.append(f"budget {r['budget']}")
    if r.get("command", "").startswith("GPUENGINE_INPUT_PROCESSES="):
        parts.append("input processes set")
    if r.get("profiled"):
        parts.append(f"under {r['profiled']} (sampling slows it)")
    if "A/B" in r.get("note", "") and r.get("variant"):
        parts.append(f"A/B: {r['variant']}")
    return ", ".join(parts) or "default"


CURVE_MAX_SEQUENCES = 2_000_000


def _cores_row(r) -> bool:
    """A host-pipeline row of a GPU machine that names its cores, not run under a profiler,
    of at most ``CURVE_MAX_SEQUENCES`` (longer runs measure how a run slows as its store
    grows, "The store's table growing", not the cores)."""
    return (r["system"] == "gpuengine-host" and bool(r.get("cores"))
            and r.get("sequences", 0) <= CURVE_MAX_SEQUENCES
            and not r.get("gpu", "").startswith("none") and not r.get("profiled"))


def host_curve_rows(recs) -> list[dict]:
    """:func:`_cores_row` rows (``--curve``/``--cores``) with the default writer (not
    GPUENGINE_WRITER_PROCESS set either way), neither an A/B pair nor an input-process sweep
    (GPUENGINE_INPUT_PROCESSES set): what the curve and issue 16's goals are judged on."""
    return [r for r in recs if _cores_row(r)
            and r.get("writer_process") in (None, "auto") and "A/B" not in r.get("note", "")
            and not r.get("command", "").startswith("GPUENGINE_INPUT_PROCESSES=")]


AB_DEFAULT_TREE = re.compile(r"(before|after)-w\d+")


def engine_of(r) -> str:
    """The commit whose engine code a row measured: ``engine_commit`` where a row was run from
    a later commit that changed only tools, else its ``commit``."""
    return r.get("engine_commit", r["commit"])


def host_goal_rows(recs) -> list[dict]:
    """What issue 16's host goals are judged on: :func:`host_curve_rows`, plus the rows of
    ``tools/bench_host_ab.sh`` that ran a commit's own tree at the defaults (variants
    ``before-wN`` / ``after-wN``; not an experiment tree, whose commit carries a ``+``, nor a
    float16 store) — the same command, only alternated with another tree on one machine."""
    ab = [r for r in recs if _cores_row(r) and r["cores"] == 16 and "A/B" in r.get("note", "")
          and AB_DEFAULT_TREE.fullmatch(r.get("variant", "")) and "+" not in r["commit"]]
    return host_curve_rows(recs) + ab


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


@dataclass
class PageRecords:
    """The rows every table of the page reads: ``every`` record, ``recs`` without
    tools/bench_fp8.py's runs (those have their own tables), the commits in ``order`` of their
    first record, and the ESM-2 ``models``, largest first."""

    every: list[dict]
    recs: list[dict] = field(init=False)
    order: list[str] = field(init=False)
    models: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.recs = [r for r in self.every if not r["_fp8_bench"]]  # bench_fp8's runs: fp8_tables
        self.order = runs(self.recs)
        self.models = [m for m in model_order(self.recs) if m.startswith("esm2")]  # ESM-2 sections

    def one(self, commit, model, wl, system, **kw):
        """The latest 1-GPU record of ``system`` on (``model``, ``wl``) in run ``commit``."""
        return latest(self.recs, commit=commit, model=model, workload=wl, system=system, n_gpus=1,
                      **kw)

    def latest_run(self, m, wl, system="gpuengine"):
        """The latest run of ``system``; for ``gpuengine``, the latest that also timed HF (the
        rows compare the two from one run)."""
        recs = self.recs
        if system == "gpuengine":
            with_hf = {r["commit"] for r in recs if r["system"] == "hf-sdpa-bf16"
                       and r.get("model") == m and r.get("workload") == wl}
            cands = [r for r in recs if r["system"] == system and r.get("model") == m
                     and r.get("workload") == wl and r.get("n_gpus", 1) == 1 and r["commit"] in with_hf]
            return max(cands, key=lambda r: r["date"])["commit"] if cands else None
        g = latest(recs, model=m, workload=wl, system=system, n_gpus=1)
        return g["commit"] if g else None


def lmdb_growth_rows(path: Path) -> list[dict]:
    """``tools/bench_lmdb_values.py`` rows with ``segments`` (the table growing) from a GPU
    machine, the newest of each layout: what :func:`load` leaves out (they run no model)."""
    newest: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("system") == "lmdb" and r.get("segments") and "CPU" not in r.get("gpu", ""):
                newest[r.get("layout", "values")] = r  # the log is in time order
    return [newest[k] for k in sorted(newest)]
