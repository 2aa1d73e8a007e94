"""The markdown of docs/benchmarks.md: every table, in the page's order."""

from __future__ import annotations

from pathlib import Path

from benchmark_page import device_tables, engine_tables, scale_tables
from benchmark_page.fp8_tables import fp8_tables
from benchmark_page.goals import goals
from benchmark_page.profiles import profile_summary
from benchmark_page.records import PageRecords

ENGINE_SECTIONS = (engine_tables.runs_overview, engine_tables.throughput,
                   engine_tables.end_to_end, engine_tables.fair_esm,
                   engine_tables.host_pipeline, engine_tables.reduced_precision,
                   engine_tables.dnabert_s, engine_tables.predict, scale_tables.merge)
"""The tables before issue 16's (replicas, serve)."""
HISTORY_SECTIONS = (engine_tables.history, engine_tables.first_run_compiled,
                    engine_tables.budget_sweeps, engine_tables.variants,
                    device_tables.gemm_skeleton, device_tables.clocks_and_power,
                    device_tables.kernel_bandwidth, device_tables.fc1_epilogue, goals)
"""The tables after them, up to the goals."""


def markdown(every: list[dict], profile: list[Path] | None) -> str:
    """Every table of the page from the records ``every`` and the kernel tables ``profile``."""
    page = PageRecords(every)
    out = []
    for section in ENGINE_SECTIONS:
        out.extend(section(page))
    out.extend(scale_tables.scale_sections(page.recs))
    for section in HISTORY_SECTIONS:
        out.extend(section(page))
    out.extend(fp8_tables(every))
    for path in profile or []:
        out.append(f"### Where the time goes: `{path.name}`\n\n" + profile_summary(path))
    return "\n\n".join(out) + "\n"
