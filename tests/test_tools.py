"""The scripts under tools/ on the CPU: every one imports and answers ``--help``; the
benchmark scripts share one results-row header (``bench_common.ResultsLog``) and ``--commit``
option; the no-op runner takes its width as an argument; and the host-pipeline benchmarks
(``bench_esm.py --systems host``, ``bench_host_dna.py``) run end to end into a real LMDB
store and append rows with the field names ``docs/benchmarks/results.jsonl`` has always had.
The GPU paths of the benchmarks run only on the device machine (tools/device_check.sh)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
SCRIPTS = sorted(p.stem for p in TOOLS.glob("*.py"))
HEADER = ["date", "commit", "gpu", "n_gpus", "command", "torch"]


@pytest.fixture
def tool(monkeypatch):
    """Imports a script of tools/ as a module, as the scripts import each other."""
    monkeypatch.syspath_prepend(str(TOOLS))

    def load(name: str):
        if name == "bench_kernels":
            pytest.importorskip("triton", reason="bench_kernels defines Triton kernels at import")
        return importlib.import_module(name)
    return load


def test_every_script_is_listed():
    assert {"bench_common", "bench_dnabert", "bench_esm", "bench_fp8", "bench_host_dna",
            "bench_kernels", "bench_merge", "bench_predict", "bench_replicas", "bench_serve",
            "bench_lmdb_values", "bench_shard_scan", "bench_startup", "bench_writer",
            "cpu_share", "host_stage_costs",
            "make_checkpoint",
            "plot_benchmarks", "pyspy_summary", "repro_cpu_fidelity"} == set(SCRIPTS)


@pytest.mark.parametrize("name", [s for s in SCRIPTS if s != "bench_common"])
def test_help(name, tool, monkeypatch, capsys):
    module = tool(name)
    monkeypatch.setattr(sys, "argv", [f"tools/{name}.py", "--help"])
    with pytest.raises(SystemExit) as done:
        module.main()
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    if name.startswith("bench_"):
        assert "--commit COMMIT" in out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux's /proc")
def test_threads_get_their_names_natively(tool):
    common = tool("bench_common")
    common.name_native_threads()
    common.name_native_threads()  # once is enough: not wrapped twice
    seen = []
    thread = threading.Thread(target=lambda: seen.append(
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()),
        name="gpuengine-committer-acks")
    thread.start()
    thread.join()
    assert seen == ["committer-acks"]  # less the prefix, cut to the kernel's 15 bytes


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux's /proc")
def test_cpu_share_reports_processes_threads_and_the_exit_status(tmp_path):
    script = tmp_path / "busy.py"
    script.write_text(
        "import ctypes, subprocess, sys, threading, time\n"
        "def spin(seconds):\n"
        "    end = time.process_time() + seconds\n"
        "    while time.process_time() < end: pass\n"
        "def worker():\n"
        "    ctypes.CDLL(None).prctl(15, b'spinner', 0, 0, 0)\n"
        "    spin(0.4)\n"
        "if sys.argv[1:] == ['child']:\n"
        "    spin(0.4)\n"
        "else:\n"
        "    child = subprocess.Popen([sys.executable, sys.argv[0], 'child'])\n"
        "    t = threading.Thread(target=worker); t.start(); t.join(); child.wait()\n"
        "    sys.exit(3)\n")
    table = tmp_path / "cpu.json"
    done = subprocess.run([sys.executable, str(TOOLS / "cpu_share.py"), "--every", "0.05",
                           "--json", str(table), "--", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr  # the command's own status
    got = json.loads(table.read_text())
    busy = got["roles"]["busy.py"]
    assert busy["processes"] == 2 and busy["user_s"] + busy["sys_s"] >= 0.6
    spinner = got["threads"]["spinner"]
    assert spinner["threads"] == 1 and spinner["user_s"] + spinner["sys_s"] >= 0.3
    assert 0 < got["machine_busy"] <= 1 and got["wall_s"] >= 0.4
    assert "busy.py" in done.stderr and "spinner" in done.stderr


def test_commit_option_default(tool, monkeypatch):
    common = tool("bench_common")
    for env, expected in (("abc1234", "abc1234"), (None, "unknown")):
        if env is None:
            monkeypatch.delenv("GPUENGINE_COMMIT", raising=False)
        else:
            monkeypatch.setenv("GPUENGINE_COMMIT", env)
        ap = argparse.ArgumentParser()
        common.add_commit_option(ap)
        assert ap.parse_args([]).commit == expected
        assert ap.parse_args(["--commit", "f00"]).commit == "f00"


def test_results_row_header(tool, monkeypatch, tmp_path):
    common = tool("bench_common")
    monkeypatch.setattr(sys, "argv", ["tools/bench_esm.py", "--systems", "host", "--out", "r.jsonl"])
    out = tmp_path / "r.jsonl"
    log = common.ResultsLog(out, "abc1234", "/somewhere/tools/bench_esm.py", model="esm2-8M")
    first = log.append(system="gpuengine-host", tokens_per_s=1.5)
    second = log.append(system="gemm-ceiling", model="esm2-3B")  # a measurement wins over a field
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [first, second]
    assert list(first) == HEADER + ["model", "system", "tokens_per_s"]
    assert first["command"] == "python tools/bench_esm.py --systems host --out r.jsonl"
    assert (first["commit"], first["n_gpus"], first["model"]) == ("abc1234", 1, "esm2-8M")
    assert first["gpu"] == common.gpu_label()
    assert first["torch"] == torch.__version__
    if not torch.cuda.is_available():
        assert first["gpu"].startswith("none (CPU, ")
    assert second["model"] == "esm2-3B"
    bare = common.ResultsLog(out, "c", "bench_predict.py", n_gpus=0, with_torch=False).row(x=1)
    assert list(bare) == ["date", "commit", "gpu", "n_gpus", "command", "x"]
    assert bare["n_gpus"] == 0


def test_noop_runner_width_is_an_argument(tool):
    common = tool("bench_common")
    assert not hasattr(common.NoopRunner, "dim_hint")
    narrow, wide = common.NoopRunner.factory(8), common.NoopRunner.factory(768)
    a, b = narrow("cpu", "fp32", ["o"]), wide("cpu", "fp32", ["o"])
    assert (a.dim, b.dim) == (8, 768)

    class Item:
        n_tokens = 5
    batch = b.finish(b.launch(b.stage([Item(), Item()])))
    assert [v.shape for v in batch.vectors["o"]] == [(768,), (768,)]
    assert not any(v.any() for v in batch.vectors["o"]) and batch.finite.all()
    assert batch.n_tokens == 10


def test_cosine_summary_and_reads(tool, tmp_path):
    common = tool("bench_common")
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    s = common.cosine_summary(a, np.array([[1.0, 0.0], [1.0, 0.0]]))
    assert s == pytest.approx({"min_cosine": 2 ** -0.5, "mean_cosine": (1 + 2 ** -0.5) / 2})
    bases = np.frombuffer(b"ACGT", dtype=np.uint8)
    rng = np.random.default_rng(0)
    path = common.write_reads_fasta(tmp_path / "r.fa", 5, lambda n: bases[rng.integers(0, 4, (n, 7))],
                                    block=2)
    lines = path.read_text().splitlines()
    assert lines[::2] == [f">read{i}" for i in range(5)]
    assert all(len(s) == 7 and set(s) <= set("ACGT") for s in lines[1::2])


def _run(module, monkeypatch, *argv):
    monkeypatch.setenv("GPUENGINE_COMMIT", "testcommit")
    monkeypatch.setattr(sys, "argv", [f"tools/{module.__name__}.py", *argv])
    module.main()


HOST_FIELDS = ["model", "workload", "system", "precision", "tokens_per_s", "sequences_per_s",
               "wall_s", "embed_s", "sequences", "workdir"]


def test_host_pipeline_esm(tool, monkeypatch, tmp_path):
    """``bench_esm.py --systems host`` with 8M-wide no-op vectors: every sequence committed,
    one row with the header and the fields of earlier runs."""
    out = tmp_path / "results.jsonl"
    _run(tool("bench_esm"), monkeypatch, "--systems", "host", "--models", "8M", "--workloads",
         "virnucpro150", "--host-sequences", "300", "--out", str(out), "--workdir", str(tmp_path))
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert list(row) == (HEADER + HOST_FIELDS[:2] + ["mean_residues"] + HOST_FIELDS[2:9]
                         + ["switch_interval_ms", "workdir", "input_process", "writer_process",
                            "writers", "writers_option", "commit_transactions", "commit_seconds",
                            "commit_wait_seconds",
                            "devices", "cores", "main_cpu_us_per_seq", "input_processes", "note"])
    assert (row["commit"], row["system"], row["model"]) == ("testcommit", "gpuengine-host", "esm2-8M")
    assert (row["writers"], row["writers_option"]) == (1, "auto")  # 300 sequences: one store
    fasta = tmp_path / "host-virnucpro150.fa"
    assert row["sequences"] == fasta.read_text().count(">") > 200
    assert not (tmp_path / "host.lmdb").exists()  # the store is removed after the run


def test_host_stage_costs(tool, monkeypatch, tmp_path, capsys):
    """``host_stage_costs.py`` on 3 000 proteins: every read committed through the engine's
    stages, a positive cost for each."""
    _run(tool("host_stage_costs"), monkeypatch, "--kind", "esm", "--reads", "3000",
         "--store", str(tmp_path / "s.lmdb"))
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["reads"] == 3000 and row["budget"] == 65536
    stages = row["us_per_read"]
    assert set(stages) == {"decode", "planner", "scheduler", "device", "engine loop",
                           "(of which encoding)", "committer", "total",
                           "writer process: engine side", "writer process: child decode",
                           "engine_total_writer_process", "writer_process_child"}
    assert all(v > 0 for v in stages.values()) and not (tmp_path / "s.lmdb").exists()


def test_host_stage_costs_times_the_part_split_and_writes_its_row(tool, monkeypatch, tmp_path,
                                                                    capsys):
    """``--writers 2``: the engine's split of each group by part is a stage of its own and
    counts in the engine's total; ``--out`` appends the printed row."""
    out = tmp_path / "results.jsonl"
    _run(tool("host_stage_costs"), monkeypatch, "--kind", "esm", "--reads", "3000",
         "--writers", "2", "--store", str(tmp_path / "s.lmdb"), "--out", str(out))
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [json.loads(line) for line in out.read_text().splitlines()] == [row]
    assert row["writers"] == 2 and row["system"] == "gpuengine-host-stages"
    stages = row["us_per_read"]
    assert stages["part split"] > 0
    assert stages["engine_total_writer_process"] == pytest.approx(
        stages["total"] - stages["committer"] + stages["writer process: engine side"]
        + stages["part split"], abs=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, "float16"])
def test_host_pipeline_dna(tool, monkeypatch, tmp_path, dtype):
    """``bench_host_dna.py`` on 300 reads: all committed, one row as before (``--store-dtype
    float16``: the no-op devices hand float16 vectors over, as a GPU's runner then does)."""
    out = tmp_path / "results.jsonl"
    _run(tool("bench_host_dna"), monkeypatch, "--reads", "300", "--out", str(out),
         "--workdir", str(tmp_path), *(["--store-dtype", dtype] if dtype else []))
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert list(row) == HEADER + HOST_FIELDS[:8] + ["validate_s"] + HOST_FIELDS[8:] + [
                                                 "devices", "cores", "budget", "input_processes",
                                                 "writer_process", "writers", "writers_option",
                                                 "store_dtype", "commit_transactions",
                                                 "commit_seconds", "commit_wait_seconds",
                                                 "store_bound", "main_cpu_us_per_seq",
                                                 "disk_written_bytes", "disk_written_per_seq",
                                                 "disk_mb_per_s", "note"]
    if row["disk_written_bytes"] is not None:  # the workdir is on a block device: the store's
        assert row["disk_written_per_seq"] > 768 * 4  # vectors reached it (fdatasync)
    assert (row["sequences"], row["model"], row["workload"]) == (300, "dnabert-s", "dna150")
    assert (row["writers"], row["writers_option"], row["budget"]) == (1, "auto", 4096)
    assert row["store_dtype"] == (dtype or "float32")  # float32: embed's default
    assert row["tokens_per_s"] > row["sequences_per_s"] > 0
    assert 0 < row["validate_s"] < row["wall_s"]


def test_shard_scan(tool, monkeypatch, tmp_path):
    """``bench_shard_scan.py``: both passes over the input, shard 0 keeps its records (about
    1/N of them), one row."""
    out = tmp_path / "results.jsonl"
    _run(tool("bench_shard_scan"), monkeypatch, "--records", "3000", "--shards", "4",
         "--workdir", str(tmp_path), "--out-row", str(out))
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["commit"], row["system"], row["records"]) == ("testcommit", "gpuengine-shard-scan",
                                                             3000)
    assert 600 < row["shard_records"] < 900 and row["records_per_s"] > 0
    assert (tmp_path / "proteins-short-3000.fa").read_text().count(">") == 3000


@pytest.mark.slow
def test_host_ab_alternates_two_trees_into_one_results_file(tmp_path):
    """``bench_host_ab.sh``: the earlier tree and this one in turn, one row each a round, each
    with its variant and commit; only results.jsonl lands in $OUT."""
    old = tmp_path / "old"
    shutil.copytree(ROOT / "gpuengine", old / "gpuengine")
    shutil.copytree(ROOT / "tools", old / "tools")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), OLD="aaaaaaa", NEW="bbbbbbb", OLD_TREE=str(old),
               SKIP_INSTALL="1", PYTHON=sys.executable, SITE=str(tmp_path / "none"), ROUNDS="1",
               VARIANTS="before-w1 after-w2 after-w1-f16", LOGS=str(tmp_path / "logs"),
               HOST_AB_ARGS=f"--reads 300 --devices 2 --workdir {tmp_path / 'w'}")
    done = subprocess.run(["bash", "tools/bench_host_ab.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["commit"], r["writers"], r["store_dtype"]) for r in rows] == [
        ("before-w1", "aaaaaaa", 1, "float32"), ("after-w2", "bbbbbbb", 2, "float32"),
        ("after-w1-f16", "bbbbbbb", 1, "float16")]
    assert all(r["note"].startswith("A/B (same machine, alternated)") and r["sequences"] == 300
               for r in rows)
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl"]
    bad = subprocess.run(["bash", "tools/bench_host_ab.sh"], cwd=ROOT, capture_output=True,
                         text=True, env=dict(env, OLD_TREE=str(tmp_path / "missing")))
    assert bad.returncode == 2 and "no tree" in bad.stderr
    unknown = subprocess.run(["bash", "tools/bench_host_ab.sh"], cwd=ROOT, capture_output=True,
                             text=True, env=dict(env, VARIANTS="after-x2"))
    assert unknown.returncode == 2 and "unknown variant" in unknown.stderr


def test_lmdb_values(tool, monkeypatch, tmp_path):
    """``bench_lmdb_values.py``: every put written (the file holds them), one row."""
    out = tmp_path / "results.jsonl"
    _run(tool("bench_lmdb_values"), monkeypatch, "--value-bytes", "1536", "--puts", "2000",
         "--per-txn", "500", "--out", str(out), "--workdir", str(tmp_path))
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["commit"], row["system"], row["value_bytes"], row["sync"]) == (
        "testcommit", "lmdb", 1536, True)
    assert row["puts_per_s"] > 0 and row["file_gb"] * 1e9 > 2000 * 1536
    assert row["written_gb"] * 1e9 >= 2000 * 1536 or row["written_gb"] == 0  # (tmpfs: none)
    assert (row["layout"], row["per_block"]) == ("values", None)
    assert not (tmp_path / "lmdb-values").exists()


def test_lmdb_values_in_blocks(tool, monkeypatch, tmp_path):
    """``--layout blocks``: the values packed in blocks (the file holds every value once,
    in fewer pages than one overflow page each), the keys indexed, one row."""
    out = tmp_path / "results.jsonl"
    args = ["--value-bytes", "3072", "--puts", "2100", "--per-txn", "700",
            "--workdir", str(tmp_path)]
    _run(tool("bench_lmdb_values"), monkeypatch, *args, "--out", str(out))
    _run(tool("bench_lmdb_values"), monkeypatch, *args, "--layout", "blocks", "--per-block",
         "21", "--out", str(out))
    plain, blocks = [json.loads(line) for line in out.read_text().splitlines()]
    assert (blocks["layout"], blocks["per_block"], blocks["puts"]) == ("blocks", 21, 2100)
    assert 2100 * 3072 < blocks["file_gb"] * 1e9 < plain["file_gb"] * 1e9


def test_lmdb_values_in_generations(tool, monkeypatch, tmp_path):
    """``--layout generations``: a new database every --generation-size values (the file
    holds every value, the row says so), and ``--segment`` reports each segment's rate."""
    out = tmp_path / "results.jsonl"
    _run(tool("bench_lmdb_values"), monkeypatch, "--layout", "generations",
         "--generation-size", "1000", "--puts", "2500", "--per-txn", "500", "--segment", "1000",
         "--out", str(out), "--workdir", str(tmp_path))
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["layout"], row["generation_size"]) == ("generations", 1000)
    assert [s["at"] for s in row["segments"]] == [1000, 2000]
    assert all(s["puts_per_s"] > 0 for s in row["segments"])
    assert row["file_gb"] * 1e9 > 2500 * 3072
    with pytest.raises(SystemExit):
        _run(tool("bench_lmdb_values"), monkeypatch, "--layout", "generations",
             "--generation-size", "1000", "--per-txn", "300", "--out", str(out))
