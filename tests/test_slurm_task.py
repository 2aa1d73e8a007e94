"""What the two sbatch scripts run, ``gpuengine slurm shard`` and ``gpuengine slurm merge``,
run here as plain processes (no SLURM needed): a task warned of its time limit (SIGUSR1, as
``--signal=B:USR1@180`` sends it) saves what it committed and exits 130 without a marker; the
next attempt on another node resumes that part, publishes the shard and marks it done; the
merge refuses while a shard has no marker, merges in place or staged on local disk, and a
second run finds it done."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import random_proteins, write_fasta
from embed_processes import committed
from gpuengine.slurm.layout import Manifest, RunLayout
from gpuengine.slurm.task import _work_dir
from held_process import held_command, held_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def slurm_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "gpuengine", "slurm", *map(str, args)]


def run(*args, code: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(slurm_cmd(*args), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env())
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc


@pytest.fixture
def cluster_run(tiny_pt, tmp_path):
    """OUT holding the manifest of a 2-shard embed run, as a submission writes it."""
    seqs = random_proteins([20 + (i * 37) % 90 for i in range(1200)], seed=6)
    fasta = write_fasta(tmp_path / "in.fa", [(f"p{i:05d}", s) for i, s in enumerate(seqs)])
    out = (tmp_path / "out").resolve()
    layout = RunLayout(out, "embed")
    manifest = Manifest(command="embed", shards=2, out=str(out),
                        argv=(str(fasta), f"--model={tiny_pt}", "--gpus=cpu", "--max-tokens=256"),
                        merged=str(out / "store.lmdb"), python=sys.executable)
    layout.slurm_dir.mkdir(parents=True)
    layout.manifest_path.write_text(json.dumps(manifest.to_json()))
    return out, layout, fasta


def stored(path: Path) -> dict[str, np.ndarray]:
    from gpuengine import EmbeddingStore

    with EmbeddingStore(path) as store:
        return dict(store.items())


def test_a_warned_task_saves_its_part_and_the_next_attempt_resumes_it(cluster_run, tmp_path):
    out, layout, fasta = cluster_run
    local_a, local_b = tmp_path / "node-a", tmp_path / "node-b"
    work = _work_dir(local_a, layout, "shard-0001-of-0002") / "shard.lmdb"
    # held (held_process.py): the task's embedding child takes no batch after its first ones
    # until the signal halts it, so the signal cannot come after the shard is complete
    task = subprocess.Popen(held_command("slurm", "shard", out, 1, "--local-dir", local_a),
                            cwd=ROOT, env=held_env(env()), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        start = time.monotonic()
        while not committed(work):
            assert task.poll() is None, task.communicate()[1]
            assert time.monotonic() - start < 180, "no commit within 180 s"
            time.sleep(0.05)
        task.send_signal(signal.SIGUSR1)  # the time limit is coming
        _, err = task.communicate(timeout=120)
    finally:
        if task.poll() is None:
            task.kill()
            task.wait()
    assert task.returncode == 130, err
    assert "Traceback" not in err
    partial = layout.partial_store(1, 2)
    assert not layout.shard_marker(1, 2).exists() and (partial / "data.mdb").exists()
    saved = committed(partial)
    assert saved > 0

    shutil.rmtree(local_a)  # the next attempt runs on another node
    run("merge", out, "--local-dir", local_b, code=1)  # shard 0 and 1 have no marker
    run("shard", out, 1, "--local-dir", local_b, code=0)
    marker = json.loads(layout.shard_marker(1, 2).read_text())
    assert marker["already_stored"] == saved and marker["exit_code"] == 0
    assert marker["committed_records"] + saved == marker["shard_records"]
    assert not partial.exists() and not list(local_b.iterdir())  # nothing left behind
    again = run("shard", out, 1, "--local-dir", local_b, code=0)  # requeued after publishing
    assert "done already" in again.stderr

    run("shard", out, 0, "--local-dir", local_b, code=0)
    run("merge", out, "--local-dir", local_b, code=0)
    merged = stored(out / "store.lmdb")
    shards = {**stored(layout.shard_store(0, 2)), **stored(layout.shard_store(1, 2))}
    assert len(merged) == 1200 and sorted(merged) == sorted(shards)
    assert all(np.array_equal(merged[k], shards[k]) for k in merged)
    assert json.loads(layout.merged_marker.read_text())["in_place"] is True
    assert "already merged" in run("merge", out, code=0).stderr

    # OUT on a network filesystem: merged on local disk first, then copied into OUT
    shutil.rmtree(out / "store.lmdb")
    layout.merged_marker.unlink()
    run("merge", out, "--staged", "--local-dir", local_b, code=0)
    assert json.loads(layout.merged_marker.read_text())["in_place"] is False
    restaged = stored(out / "store.lmdb")
    assert sorted(restaged) == sorted(merged)
    assert all(np.array_equal(restaged[k], merged[k]) for k in merged)
    assert not list(local_b.iterdir())
