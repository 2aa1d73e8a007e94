"""``gpuengine slurm embed|predict|status`` on a real SLURM (the one-host cluster of
tools/slurm_local.sh in CI): a 4-shard run equals one process's store; an array task cancelled
mid-run and the same command submitted again leaves every sequence exactly once (the shard
resumes what it had committed); ``--no-merge`` runs the array alone, its shards read as one
store; ``slurm predict`` writes one run's three files; the scripts
are accepted by ``sbatch --test-only``. Each test submits jobs that start Python on the node,
so they take tens of seconds (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import random_proteins, write_fasta
from cli_runs import PREDICT_OUTPUTS as OUTPUTS
from cli_runs import predict as _predict
from embed_processes import committed
from virnucpro_files import reads_fasta

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6


def env() -> dict[str, str]:
    """The test's environment (SLURM_CONF, offline cache) with one CPU thread per process:
    sbatch passes it on to the jobs, several of which share this small machine's cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def gpuengine(*args, code: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "gpuengine", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


def gpus(slurm) -> str:
    """--gpus-per-node for this cluster: 1 where it has (fake) GPUs, else 0 (a GPU request
    would be refused); the tasks run on the CPU either way (--gpus cpu)."""
    return str(min(slurm.gpus_per_node, 1))


def submit(slurm, *args) -> dict:
    submitted = json.loads(gpuengine("slurm", *args, "--json").stdout)
    assert not submitted["dry_run"]
    return submitted


def wait(slurm, submitted: dict, timeout: float = 300) -> dict:
    jobs = [j for j in (submitted["array_job"], submitted["merge_job"]) if j]
    return slurm.wait(*jobs, timeout=timeout)


def status(out: Path, code: int = 0) -> dict:
    return json.loads(gpuengine("slurm", "status", out, "--json", code=code).stdout)


def store_vectors(path: Path) -> dict[str, np.ndarray]:
    from gpuengine import EmbeddingStore

    with EmbeddingStore(path) as store:
        ids = list(store.ids())
        assert len(ids) == len(set(ids)) == len(store)  # every id once
        return dict(store.items())


def assert_same_store(path: Path, reference: dict[str, np.ndarray]) -> None:
    vectors = store_vectors(path)
    assert sorted(vectors) == sorted(reference)
    worst = max(float(np.abs(vectors[k] - reference[k]).max()) for k in reference)
    assert worst <= TOL, f"vectors differ from the single run by {worst:.3g}"


def proteins(tmp_path: Path, n: int, seed: int) -> Path:
    seqs = random_proteins([20 + (i * 37) % 90 for i in range(n)], seed=seed)
    for i in range(9, n, 9):
        seqs[i] = seqs[i - 4]  # the same sequence under another id: one shard holds both
    return write_fasta(tmp_path / "proteins.fa", [(f"p{i:05d}", s) for i, s in enumerate(seqs)])


def single_run(fasta: Path, model: Path, out: Path, *extra) -> dict[str, np.ndarray]:
    gpuengine("embed", fasta, "-m", model, "--out", out, "--gpus", "cpu", "-q", *extra)
    return store_vectors(out)


def test_four_shards_equal_one_run_and_a_resubmission_does_nothing(slurm, tiny_pt, tmp_path):
    fasta = proteins(tmp_path, 240, seed=4)
    reference = single_run(fasta, tiny_pt, tmp_path / "single.lmdb")
    out = tmp_path / "run"
    args = ["embed", fasta, "-m", tiny_pt, "--out", out, "--shards", "4", "--gpus", "cpu",
            "--gpus-per-node", gpus(slurm), "--time", "10:00"]
    submitted = submit(slurm, *args)
    assert submitted["missing"] == [0, 1, 2, 3]
    jobs = wait(slurm, submitted)
    assert {j.state for j in jobs.values()} == {"COMPLETED"}, jobs
    assert_same_store(out / "store.lmdb", reference)

    found = status(out)
    assert found["counts"]["done"] == 4 and found["merge"]["state"] == "done"
    assert sum(s["shard_records"] for s in
               (json.loads((out / "shards" / f"shard-{i:04d}-of-0004.done").read_text())
                for i in range(4))) == 240
    # published shard stores are ordinary stores; nothing is left on the node-local disk
    assert len(list((out / "shards").glob("shard-*.lmdb"))) == 4
    assert not list((out / "shards").glob(".*"))
    text = gpuengine("slurm", "status", out).stdout
    assert "4 done" in text and "merge: done" in text

    again = submit(slurm, *args)
    assert again["complete"] and again["array_job"] is None and again["merge_job"] is None
    # other arguments into the same OUT are refused (its shards depend on them)
    other = list(args)
    other[other.index("--shards") + 1] = "3"
    refused = gpuengine("slurm", *other, code=2)
    assert "--shards 4 → 3" in refused.stderr


def test_no_merge_runs_the_array_alone_and_the_shards_read_as_one(slurm, tiny_pt, tmp_path):
    fasta = proteins(tmp_path, 120, seed=5)
    reference = single_run(fasta, tiny_pt, tmp_path / "single.lmdb")
    out = tmp_path / "run"
    args = ["embed", fasta, "-m", tiny_pt, "--out", out, "--shards", "2", "--gpus", "cpu",
            "--gpus-per-node", gpus(slurm), "--time", "10:00", "--no-merge"]
    submitted = submit(slurm, *args)
    assert submitted["merge_job"] is None and len(submitted["sbatch"]) == 1
    jobs = wait(slurm, submitted)
    assert {j.state for j in jobs.values()} == {"COMPLETED"}, jobs
    assert not (out / "store.lmdb").exists() and not (out / "slurm" / "merge.sbatch").exists()
    found = status(out)  # exit 0: the merge is skipped, not missing
    assert found["counts"]["done"] == 2 and found["merge"]["state"] == "skipped"
    assert_same_store(out / "shards", reference)  # the directory read as one store
    again = submit(slurm, *args)
    assert again["complete"] and again["array_job"] is None
    gpuengine("merge", out / "store.lmdb", out / "shards", "-q")  # merged later, by hand
    assert_same_store(out / "store.lmdb", reference)


def test_cancelled_task_then_resubmitted_every_sequence_once(slurm, tiny_pt, tmp_path):
    """scancel of a running task: the task drains and saves what it committed, SLURM cancels
    the merge (--kill-on-invalid-dep), status says so; the same command submitted again runs
    only that shard, resuming the saved part, and a new merge."""
    fasta = proteins(tmp_path, 1200, seed=6)
    reference = single_run(fasta, tiny_pt, tmp_path / "single.lmdb", "--max-tokens", "256")
    out, local = tmp_path / "run", tmp_path / "local"
    args = ["embed", fasta, "-m", tiny_pt, "--out", out, "--shards", "2", "--gpus", "cpu",
            "--max-tokens", "256", "--gpus-per-node", gpus(slurm), "--local-dir", local]
    first = submit(slurm, *args)
    task = f"{first['array_job']}_1"

    def shard_1_committed():
        stores = list(local.glob("gpuengine-*-shard-0001-of-0002/shard.lmdb"))
        return stores and committed(stores[0])

    try:
        slurm.wait_until(shard_1_committed, timeout=180, what="shard 1 committed a group")
        slurm.cancel(task)
        jobs = wait(slurm, first)
    finally:
        slurm.run("scancel", first["array_job"], first["merge_job"], check=False)
    assert jobs[task].state == "CANCELLED"
    assert jobs[first["merge_job"]].state == "CANCELLED"  # not pending for ever
    assert (out / "shards" / ".shard-0001-of-0002.partial.lmdb" / "data.mdb").exists()
    saved = committed(out / "shards" / ".shard-0001-of-0002.partial.lmdb")

    found = status(out, code=1)
    by_name = {s["name"]: s for s in found["shard_states"]}
    assert by_name["1/2"]["state"] == "failed" and "CANCELLED" in by_name["1/2"]["detail"]
    assert "partial store saved" in by_name["1/2"]["detail"]
    assert found["merge"]["state"] == "failed"
    if jobs[f"{first['array_job']}_0"].state == "COMPLETED":
        assert by_name["0/2"]["state"] == "done"

    second = submit(slurm, *args)
    assert second["missing"] == [i for i, s in enumerate(found["shard_states"])
                                 if s["state"] != "done"]
    assert 1 in second["missing"]
    jobs = wait(slurm, second)
    assert {j.state for j in jobs.values()} == {"COMPLETED"}, jobs
    assert_same_store(out / "store.lmdb", reference)  # every sequence exactly once
    marker = json.loads((out / "shards" / "shard-0001-of-0002.done").read_text())
    assert marker["already_stored"] == saved > 0  # resumed, nothing embedded twice
    assert not (out / "shards" / ".shard-0001-of-0002.partial.lmdb").exists()
    assert status(out)["merge"]["state"] == "done"


def test_slurm_predict_writes_one_runs_files(slurm, predict_models, tmp_path):
    models = predict_models
    esm, dna, _, mlp_path = models
    reads_fasta(tmp_path / "reads.fasta", n=40)
    fasta = tmp_path / "reads.fasta"
    _predict(fasta, models, tmp_path / "single")
    out = tmp_path / "run"
    submitted = submit(slurm, "predict", fasta, "--length", "500", "--classifier", mlp_path,
                       "--esm-model", esm, "--dnabert-model", dna, "--gpus", "cpu", "--offline",
                       "--out", out, "--shards", "3", "--gpus-per-node", gpus(slurm))
    jobs = wait(slurm, submitted)
    assert {j.state for j in jobs.values()} == {"COMPLETED"}, jobs
    for name in OUTPUTS:  # the same rows in the same order; scores from other batches
        a = (tmp_path / "single" / name).read_text().splitlines()
        b = (out / name).read_text().splitlines()
        assert [r.split("\t")[0] for r in a] == [r.split("\t")[0] for r in b], name
        assert [r.split("\t")[1:2] for r in a] == [r.split("\t")[1:2] for r in b], name
    scores = [np.array([[float(x) for x in r.split("\t")[2:]] for r in
                        (p / "prediction_results.txt").read_text().splitlines()[1:]])
              for p in (tmp_path / "single", out)]
    assert np.abs(scores[0] - scores[1]).max() <= 1e-5
    assert (out / "embeddings.lmdb" / "data.mdb").exists()
    assert status(out)["merge"]["state"] == "done"


def test_dry_run_scripts_are_what_sbatch_accepts(slurm, tiny_pt, tmp_path):
    """--dry-run writes both scripts and submits nothing; SLURM accepts them as they are
    (sbatch --test-only)."""
    fasta = proteins(tmp_path, 10, seed=1)
    out = tmp_path / "run"
    before = slurm.run("squeue", "-h", "-o", "%i").stdout.split()
    dry = json.loads(gpuengine("slurm", "embed", fasta, "-m", tiny_pt, "--out", out, "--shards",
                               "3", "--gpus-per-node", gpus(slurm), "--time", "5:00",
                               "--dry-run", "--json").stdout)
    assert dry["dry_run"] and dry["array_job"] is None and dry["merge_job"] is None
    assert slurm.run("squeue", "-h", "-o", "%i").stdout.split() == before
    assert not (out / "slurm" / "job.json").exists()
    assert not (out / "slurm" / "submissions.jsonl").exists()
    for script in (dry["array_script"], dry["merge_script"]):
        test = slurm.run("sbatch", "--test-only", script, check=False)
        assert test.returncode == 0 and "to start at" in test.stderr, test.stderr
