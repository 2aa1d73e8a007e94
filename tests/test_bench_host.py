"""The host benches' ``--devices``, ``--cores`` and ``--curve`` (tools/bench_common.py): one
row per core count, each from a fresh process pinned to that many cores, with the no-op
devices, the cores and the input processes it ran with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_curve_writes_one_row_per_core_count(tmp_path):
    out = tmp_path / "rows.jsonl"
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "GPUENGINE_COMMIT": "testcommit", "PYTHONPATH": str(ROOT),
           "GPUENGINE_INPUT_PROCESS": "1"}  # children even for 300 reads
    subprocess.run([sys.executable, "tools/bench_host_dna.py", "--reads", "300", "--devices", "3",
                    "--curve", "1,2", "--out", str(out), "--workdir", str(tmp_path)],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["cores"], r["devices"], r["sequences"]) for r in rows] == \
        [(1, 3, 300), (min(2, cores), 3, 300)]
    assert [r["input_processes"] for r in rows] == [1, min(2, cores)]
    assert all(r["system"] == "gpuengine-host" and "--cores" in r["command"] for r in rows)
    assert all(r["writers"] == 1 and "store_bound" in r for r in rows)  # short runs: null
