"""tools/benchmark_page (the markdown of docs/benchmarks.md, split out of
tools/plot_benchmarks.py) on the real benchmark log: every table in the page's order, the
optional tables left out when their rows are, and the kernel-table summary of a profile."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "docs" / "benchmarks" / "results.jsonl"
ORDER = ["The runs", "Throughput", "End to end", "fair-esm", "Host pipeline", "Reduced precision",
         "DNABERT-S", "`gpuengine predict`", "`gpuengine merge`", "Replicas per GPU",
         "Many small files", "History", "Run `", "Budget sweeps", "Pipeline and kernel variants",
         "Burst GEMM", "SM clock", "Kernel bandwidth", "fc1", "Goals", "GEMM ceilings",
         "The engine against each ceiling", "FP8 against fp16", "The fidelity guard",
         "Issue 17's goals"]


@pytest.fixture
def page(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    for name in [m for m in sys.modules if m.split(".")[0] == "benchmark_page"]:
        monkeypatch.delitem(sys.modules, name)
    from benchmark_page import page, records
    return page, records


def headings(text: str) -> list[str]:
    return [line[4:] for line in text.splitlines() if line.startswith("### ")]


def test_every_table_in_the_pages_order(page):
    markdown, load = page[0].markdown, page[1].load
    found = headings(markdown(load(LOG), []))
    assert len(found) == len(ORDER), found
    for heading, start in zip(found, ORDER):
        assert heading.startswith(start), (heading, start)


def test_optional_tables_go_with_their_rows(page):
    markdown, load = page[0].markdown, page[1].load
    recs = [r for r in load(LOG) if r["system"] not in ("gpuengine-predict", "gpuengine-merge")]
    found = headings(markdown(recs, []))
    assert not [h for h in found if h.startswith(("`gpuengine predict`", "`gpuengine merge`"))]
    assert len(found) == len(ORDER) - 2


def test_a_profile_is_summarised_last(page):
    markdown, load = page[0].markdown, page[1].load
    profile = ROOT / "docs" / "benchmarks" / "profile-3B-virnucpro150-f8cdb51.txt"
    text = markdown(load(LOG), [profile])
    assert headings(text)[-1] == f"Where the time goes: `{profile.name}`"
    assert "Self CUDA time total:" in text.rsplit("### ", 1)[1]


def test_profile_runs_and_writer_settings_stay_out_of_results(page, tmp_path):
    """A row whose note says PROFILE RUN (timed under py-spy) is never loaded, so no table
    shows it; a host row with GPUENGINE_WRITER_PROCESS set says so and is no point of the
    cores curve (the default writer's row at the same cores is)."""
    records = page[1]
    base = {"date": "2026-12-03T17:00:00+00:00", "commit": "c0ffee1", "gpu": "NVIDIA H200", "n_gpus": 1,
            "command": "x"}
    rows = [dict(base, system="gpuengine-predict", model="virnucpro", workload="reads150-200k",
                 note="cold run; PROFILE RUN under py-spy"),
            dict(base, system="gpuengine-predict", model="virnucpro", workload="reads150-1M", note="cold run"),
            dict(base, system="gpuengine-host", model="dnabert-s", workload="dna150", cores=16,
                 devices=8, input_processes=14, writer_process="auto"),
            dict(base, system="gpuengine-host", model="dnabert-s", workload="dna150", cores=16,
                 devices=8, input_processes=14, writer_process="0"),
            dict(base, system="lmdb", value_bytes=3072, puts_per_s=1.0)]  # runs no model
    log = tmp_path / "results.jsonl"
    log.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    recs = records.load(log)
    assert [r["workload"] for r in recs if r["system"] == "gpuengine-predict"] == ["reads150-1M"]
    assert "lmdb" not in {r["system"] for r in recs}
    curve = records.host_curve_rows(recs)
    assert [r["writer_process"] for r in curve] == ["auto"]
    settings = [records.host_setting(r) for r in recs if r["system"] == "gpuengine-host"]
    assert "writer" not in settings[0]
    assert settings[1].startswith("writer thread (GPUENGINE_WRITER_PROCESS=0)")


def test_the_real_log_shows_no_profile_run(page):
    markdown, load = page[0].markdown, page[1].load
    text = markdown(load(LOG), [])
    assert "e06cec5` | reads150-200k" not in text


def test_a_host_row_without_times_shows_dashes(page):
    """A host row rebuilt from a call's printed output (rate, no wall or embedding time) is
    in the host table with dashes where its times would be."""
    from benchmark_page.engine_tables import host_pipeline

    records = page[1]
    recs = records.load(LOG)
    row = next(r for r in recs if r["commit"] == "42def9b" and "wall_s" not in r)
    table = "\n".join(host_pipeline(records.PageRecords(recs)))
    assert "| `42def9b` | dnabert-s | dna150 |" in table and "| — | — | **162 518** | — |" in table
    assert row["sequences_per_s"] == 162518


def test_table_growth_rows_and_figure(page, tmp_path, monkeypatch):
    """The LMDB-alone rows with segments that ``table_growth.png`` draws: the newest of each
    layout from a GPU machine (a CPU row or a row without segments is not picked), drawn."""
    import json

    records = page[1]
    base = {"system": "lmdb", "value_bytes": 3072, "per_txn": 42000, "commit": "c1",
            "gpu": "NVIDIA H200", "segments": [{"at": 10, "puts_per_s": 5, "disk_written_per_value": 4}]}
    log = tmp_path / "results.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {**base, "layout": "values", "commit": "old"},
        {**base, "layout": "values"},
        {**base, "layout": "generations", "generation_size": 10},
        {**base, "layout": "generations", "gpu": "none (CPU, 2 cores)", "commit": "cpu"},
        {**base, "layout": "blocks", "segments": None},
    ]) + "\n")
    rows = records.lmdb_growth_rows(log)
    assert [(r["layout"], r["commit"]) for r in rows] == [("generations", "c1"), ("values", "c1")]
    pytest.importorskip("matplotlib")
    from benchmark_page.figures import plot_table_growth
    plot_table_growth(rows, tmp_path / "growth.png")
    assert (tmp_path / "growth.png").stat().st_size > 10_000
    assert records.lmdb_growth_rows(LOG)  # the real log has them (this session's device rows)


def test_host_goal_judges_the_newest_engine_codes_best_run(page, tmp_path):
    """Issue 16's 16-core goal row: a commit's own tree alternated by bench_host_ab.sh counts
    (the same command), an experiment tree (``+`` in its commit) does not, and runs of a later
    commit that changed only tools count as the engine code they ran (``engine_commit``)."""
    import json

    from benchmark_page.goals import goals

    records = page[1]

    def host(commit, rate, minute, **extra):
        return {"date": f"2099-12-04T20:{minute:02d}:00+00:00", "commit": commit, "system": "gpuengine-host",
                "model": "dnabert-s", "workload": "dna150", "gpu": "NVIDIA H200", "cores": 16,
                "sequences": 2_000_000, "sequences_per_s": rate, "devices": 8, "writers": 2,
                "writer_process": "auto", "tokens_per_s": 30 * rate, **extra}

    def goal_row(rows):
        log = tmp_path / "results.jsonl"
        log.write_text(LOG.read_text() + "".join(json.dumps(r) + "\n" for r in rows))
        table = goals(records.PageRecords(records.load(log)))[0]
        return next(line for line in table.splitlines() if "≥ 220 k" in line)

    ab = {"note": "A/B (same machine, alternated): no-op"}
    rows = [host("aaaa111", 150_000, 1),
            host("bbbb222", 230_000, 2, variant="after-w2", **ab),
            host("bbbb222+exp", 300_000, 3, variant="exp", **ab),
            host("cccc333", 140_000, 4, variant="after-w2", engine_commit="bbbb222", **ab)]
    row = goal_row(rows)
    assert row.startswith("| host pipeline, dnabert-s dims") and row.endswith("| yes |")
    assert "230 000 seq/s" in row and "an alternated A/B row" in row
    assert "other runs 140 000 (`cccc333`)" in row and "earlier 150 000 (`aaaa111`)" in row
    assert "300 000" not in row
    rows[1]["commit"] = "bbbb222+exp"  # without the commit's own tree, the newest code falls short
    row = goal_row(rows)
    assert "140 000 seq/s" in row and row.endswith("36 % short) |")


def test_the_cores_figure_dashes_the_previous_curve_not_repeats_at_one_core_count(page):
    """A line of the host-cores figure: the newest commit, and the newest earlier one that
    measured several core counts (two runs at 16 cores alone are not a curve)."""
    from benchmark_page.figures import curve_commits

    def rows(commit, *cores):
        return [{"commit": commit, "cores": c} for c in cores]

    group = rows("old", 2, 4, 8, 16) + rows("ab", 16, 16) + rows("new", 2, 4, 8, 16)
    assert curve_commits(group) == ["new", "old"]
    assert curve_commits(rows("only", 16)) == ["only"]
