"""tools/bench_replicas.py and tools/bench_serve.py in their ``--quick`` CPU modes: they run
end to end (real engine, real ``gpuengine serve`` processes, real stores) and append rows with
the fields the issue asks for (``replicas_per_gpu``; system ``gpuengine-serve`` with the two
workloads, the ratio and the median file latency)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _main(monkeypatch, name: str, *argv: str) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import importlib

    module = importlib.import_module(name)
    monkeypatch.setattr(sys, "argv", [f"tools/{name}.py", *argv])
    module.main()


@pytest.mark.slow
def test_bench_replicas_quick(monkeypatch, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    _main(monkeypatch, "bench_replicas", "--quick", "--models", "esm2-8M", "--replicas", "1,2",
          "--sequences", "150", "--out", str(out), "--workdir", str(tmp_path / "w"))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["system"], r["replicas_per_gpu"]) for r in rows] == [
        ("gpuengine-replicas-e2e", 1), ("gpuengine-replicas", 1),
        ("gpuengine-replicas-e2e", 2), ("gpuengine-replicas", 2)]
    for row in rows:
        # the tiny model that ran, not the esm2-8M it stands in for
        assert row["model"] == "tiny stand-in for esm2-8M" and row["workload"] == "virnucpro150"
        assert row["sequences"] == 150 and row["sequences_per_s"] > 0
        assert [d["device"] for d in row["devices"]] == (
            ["cpu"] if row["replicas_per_gpu"] == 1 else ["cpu#0", "cpu#1"])
        assert sum(d["sequences"] for d in row["devices"]) == 150
    assert rows[0]["speedup_vs_r1"] == 1.0
    summary = capsys.readouterr().out.split("# model, system")[1].splitlines()[1:]
    assert [line.split(" R=")[0].split() for line in summary] == [
        ["tiny", "stand-in", "for", "esm2-8M", system]
        for system in ("gpuengine-replicas-e2e", "gpuengine-replicas")]
    assert all(line.count("R=") == 2 for line in summary), summary  # R = 1 and 2 of that model


@pytest.mark.slow
def test_bench_serve_quick(monkeypatch, tmp_path):
    out = tmp_path / "rows.jsonl"
    _main(monkeypatch, "bench_serve", "--quick", "--files", "8", "--per-file", "10",
          "--out", str(out), "--workdir", str(tmp_path / "w"))
    single, many = [json.loads(line) for line in out.read_text().splitlines()]
    assert (single["system"], single["workload"], single["files"]) == (
        "gpuengine-serve", "files-1x80", 1)
    assert (many["workload"], many["files"], many["sequences"]) == ("files-8x10", 8, 80)
    assert single["sequences"] == 80 and single["replicas_per_gpu"] == 1
    assert single["model"] == many["model"] == "tiny stand-in for esm2-650M"  # what ran
    assert many["ratio_vs_single"] == pytest.approx(
        many["sequences_per_s"] / single["sequences_per_s"])
    assert 0 < many["file_latency_s"]["median"] <= many["seconds"] + 1
    assert many["claim_to_done_s"]["median"] > 0
