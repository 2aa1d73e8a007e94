"""``gpuengine slurm`` where no SLURM is needed: --dry-run writes the two scripts (what they ask
SLURM for, what they run) and submits nothing; without sbatch, bad options and a directory that
is not a run, a clear message and the documented exit code, never a traceback. The runs
themselves are in tests/test_slurm_run.py (real SLURM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import random_proteins, write_fasta
from gpuengine.slurm.submit import index_ranges

ROOT = Path(__file__).resolve().parents[1]


def gpuengine(*args, code: int, path: str | None = None) -> subprocess.CompletedProcess:
    """The CLI in a process; ``path``: its PATH (an empty directory: no SLURM commands)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if path is not None:
        env["PATH"] = path
    proc = subprocess.run([sys.executable, "-m", "gpuengine", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


@pytest.fixture
def fasta(tmp_path) -> Path:
    seqs = random_proteins([12, 30, 45], seed=2)
    return write_fasta(tmp_path / "in.fa", [(f"s{i}", s) for i, s in enumerate(seqs)])


def test_index_ranges():
    assert index_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert index_ranges([3]) == "3" and index_ranges([2, 0, 1]) == "0-2"


def test_dry_run_writes_both_scripts_and_submits_nothing(tiny_pt, fasta, tmp_path):
    out = tmp_path / "run"
    proc = gpuengine("slurm", "embed", fasta, "-m", tiny_pt, "--out", out, "--shards", "3",
                     "--pool", "mean,bos", "--layers=-1,-2", "--max-residues", "50",
                     "--gpus-per-node", "4", "--partition", "gpu", "--time", "1:00:00",
                     "--mem", "100G", "--sbatch-arg=--account=lab", "--sbatch-arg=--qos=high",
                     "--local-dir", "/scratch/$USER", "--dry-run", "--json", "-v",
                     code=0, path=str(tmp_path))  # no sbatch needed for a dry run
    dry = json.loads(proc.stdout)
    assert dry["dry_run"] and dry["array_job"] is None and dry["missing"] == [0, 1, 2]
    assert dry["sbatch"][0][-2:] == ["--array=0-2", str(out / "slurm" / "embed-array.sbatch")]
    assert "--dependency=afterok:<array job>" in dry["sbatch"][1]
    assert not (out / "slurm" / "job.json").exists()  # nothing submitted, nothing recorded
    array = (out / "slurm" / "embed-array.sbatch").read_text()
    merge = (out / "slurm" / "merge.sbatch").read_text()
    for line in ("--array=0-2", "--gres=gpu:4", "--mem=100G", "--time=1:00:00",
                 "--partition=gpu", "--account=lab", "--qos=high", "--signal=B:USR1@180",
                 f"--output={out}/slurm/logs/embed-%A_%a.log"):
        assert f"#SBATCH {line}\n" in array, line
    for line in ("--kill-on-invalid-dep=yes", "--partition=gpu", "--account=lab",
                 f"--output={out}/slurm/logs/merge-%j.log"):
        assert f"#SBATCH {line}\n" in merge, line
    assert "--gres" not in merge and "--array" not in merge  # the merge needs no GPU
    # the plain command each task runs: the user's options, absolute paths, no logging flags
    assert (f"#   gpuengine embed {fasta} --model={tiny_pt} --layers=-1,-2 --pool=mean,bos "
            "--max-residues=50 --shard I/3 ...") in array
    assert (f'slurm shard {out} "$SLURM_ARRAY_TASK_ID" --local-dir "/scratch/$USER"\n'
            in array)
    assert f"slurm merge {out} --local-dir" in merge
    for script in (array, merge):
        assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_cpu_only_nodes_ask_for_no_gpu(tiny_pt, fasta, tmp_path):
    gpuengine("slurm", "embed", fasta, "-m", tiny_pt, "--out", tmp_path / "run", "--shards",
              "2", "--gpus-per-node", "0", "--dry-run", code=0)
    assert "gres" not in (tmp_path / "run" / "slurm" / "embed-array.sbatch").read_text()


def test_without_sbatch_a_clear_error_and_nothing_recorded(tiny_pt, fasta, tmp_path):
    out = tmp_path / "run"
    proc = gpuengine("slurm", "embed", fasta, "-m", tiny_pt, "--out", out, "--shards", "2",
                     code=1, path=str(tmp_path))
    assert "sbatch/squeue not found" in proc.stderr and "--dry-run" in proc.stderr
    assert not (out / "slurm" / "job.json").exists()


@pytest.mark.parametrize("args, code, words", [
    (["--shards", "0"], 2, "--shards 0: at least 1"),
    (["--shards", "2", "--gpus-per-node", "-1"], 2, "--gpus-per-node -1"),
    (["--shards", "2", "--table", "bad name!"], 2, "bad name!"),
    (["--shards", "2", "--precision", "fp8"], 2, "fp8"),
    (["--shards"], 2, "--shards"),
])
def test_usage_errors(tiny_pt, fasta, tmp_path, args, code, words):
    proc = gpuengine("slurm", "embed", fasta, "-m", tiny_pt, "--out", tmp_path / "run", *args,
                     "--dry-run", code=code)
    assert words in proc.stderr
    assert not (tmp_path / "run" / "slurm").exists()


def test_missing_inputs_are_named(tiny_pt, tmp_path):
    proc = gpuengine("slurm", "embed", tmp_path / "nope.fa", "-m", tiny_pt, "--out",
                     tmp_path / "run", "--shards", "2", "--dry-run", code=1)
    assert "nope.fa: no such file" in proc.stderr and "shared filesystem" in proc.stderr
    proc = gpuengine("slurm", "predict", tmp_path / "reads.fa", "--shards", "2", "--dry-run",
                     code=2)
    assert "--length" in proc.stderr and "--classifier" in proc.stderr


def test_status_of_a_directory_that_is_not_a_run(tmp_path):
    proc = gpuengine("slurm", "status", tmp_path, code=2)
    assert "is not the output of gpuengine slurm" in proc.stderr
