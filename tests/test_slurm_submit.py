"""``gpuengine slurm`` where no SLURM is needed: --dry-run writes the two scripts (what they ask
SLURM for, what they run) and submits nothing; without sbatch, bad options and a directory that
is not a run, a clear message and the documented exit code, never a traceback. The runs
themselves are in tests/test_slurm_run.py (real SLURM). --no-merge: the array alone, refused
for predict, part of the run's arguments, and ``slurm status`` not asking for a merge; the
hidden temporaries a killed copy leaves, cleaned per shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import random_proteins, write_fasta
from gpuengine.shards import shard_name
from gpuengine.slurm.layout import Manifest, RunLayout, remove_temporaries, write_marker
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
    (["--shards", "2", "--precision", "fp4"], 2, "fp4"),
    (["--shards", "2", "--precision", "fp8", "--fp8-min-cosine", "1.5"], 2,
     "--fp8-min-cosine 1.5"),
    (["--shards"], 2, "--shards"),
])
def test_usage_errors(tiny_pt, fasta, tmp_path, args, code, words):
    proc = gpuengine("slurm", "embed", fasta, "-m", tiny_pt, "--out", tmp_path / "run", *args,
                     "--dry-run", code=code)
    assert words in proc.stderr
    assert not (tmp_path / "run" / "slurm").exists()


@pytest.mark.slow  # two real processes, 5 s on an idle 2-core machine
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


def test_no_merge_dry_run_writes_only_the_array(tiny_pt, fasta, tmp_path):
    out = tmp_path / "run"
    args = ("slurm", "embed", fasta, "-m", tiny_pt, "--out", out, "--shards", "3", "--no-merge",
            "--dry-run")
    dry = json.loads(gpuengine(*args, "--json", code=0, path=str(tmp_path)).stdout)
    assert dry["merge"] is False and dry["merge_script"] == "" and dry["merge_job"] is None
    assert dry["sbatch"] == [["sbatch", "--parsable", "--array=0-2",
                              str(out / "slurm" / "embed-array.sbatch")]]
    assert (out / "slurm" / "embed-array.sbatch").exists()
    assert not (out / "slurm" / "merge.sbatch").exists()
    text = gpuengine(*args, code=0, path=str(tmp_path)).stdout
    shards = out / "shards"
    assert "merge.sbatch" not in text and "--dependency" not in text
    assert f"gpuengine lookup {shards} ID" in text and f"gpuengine info {shards}" in text
    assert f"gpuengine merge {out / 'store.lmdb'} {shards}" in text


def test_no_merge_is_refused_for_predict(tmp_path):
    proc = gpuengine("slurm", "predict", tmp_path / "reads.fa", "-l", "500", "-c",
                     tmp_path / "500_model.pth", "--out", tmp_path / "run", "--shards", "2",
                     "--no-merge", "--dry-run", code=2)
    assert "--no-merge" in proc.stderr and "slurm predict" in proc.stderr
    assert not (tmp_path / "run").exists()


def _recorded_run(out: Path, argv: tuple[str, ...], shards: int, merge: bool) -> RunLayout:
    """OUT as a submission records it (manifest, one submission of the array, no merge job
    when ``merge`` is False)."""
    layout = RunLayout(out.resolve(), "embed")
    manifest = Manifest(command="embed", argv=argv, shards=shards, out=str(layout.out),
                        merged=str(layout.out / "store.lmdb"), python=sys.executable,
                        merge=merge)
    layout.logs_dir.mkdir(parents=True)
    layout.manifest_path.write_text(json.dumps(manifest.to_json()))
    layout.add_submission({"array_job": "41", "shards": list(range(shards)), "cancelled": []})
    return layout


def test_a_resubmission_must_repeat_no_merge(tiny_pt, fasta, tmp_path):
    argv = (str(fasta), f"--model={Path(tiny_pt).absolute()}")
    for recorded, given in ((True, ["--no-merge"]), (False, [])):
        out = tmp_path / f"run-{recorded}"
        _recorded_run(out, argv, 2, merge=recorded)
        proc = gpuengine("slurm", "embed", fasta, "-m", tiny_pt, "--out", out, "--shards", "2",
                         *given, "--dry-run", code=2)
        assert ("--no-merge given now" if recorded else "--no-merge missing") in proc.stderr
        assert "arguments '" not in proc.stderr, proc.stderr  # nothing else differs
    # a manifest written before --no-merge existed is a merging run
    old = Manifest(command="embed", argv=argv, shards=2, out="o", merged="o/store.lmdb")
    data = old.to_json()
    del data["merge"]
    assert Manifest.from_json(data).merge is True


def test_status_of_a_no_merge_run_reports_no_missing_merge(tiny_pt, fasta, tmp_path):
    out = tmp_path / "run"
    argv = (str(fasta), f"--model={Path(tiny_pt).absolute()}")
    layout = _recorded_run(out, argv, 2, merge=False)
    for i in range(2):
        write_marker(layout.shard_marker(i, 2), {"shard_records": 1, "seconds": 1})
    proc = gpuengine("slurm", "status", out, code=0, path=str(tmp_path))  # no SLURM here
    assert "merge: skipped" in proc.stdout and "next:" not in proc.stdout
    assert f"gpuengine merge {layout.out / 'store.lmdb'} {layout.shards_dir}" in proc.stdout
    status = json.loads(gpuengine("slurm", "status", out, "--json", code=0,
                                  path=str(tmp_path)).stdout)
    assert status["no_merge"] is True and status["merge"]["state"] == "skipped"
    assert status["counts"]["done"] == 2
    # submitted again: every shard is done and nothing is to merge, so nothing is submitted
    again = gpuengine("slurm", "embed", fasta, "-m", tiny_pt, "--out", out, "--shards", "2",
                      "--no-merge", "--dry-run", code=0, path=str(tmp_path))
    assert "complete already: every shard is done" in again.stdout
    assert not layout.merge_script.exists()


def _touch(path: Path, directory: bool) -> Path:
    if directory:
        path.mkdir(parents=True)
        (path / "data.mdb").write_bytes(b"x")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    return path


def test_a_killed_copy_is_cleaned_by_the_next_attempt_of_its_shard_only(tmp_path):
    layout = RunLayout(tmp_path / "out")
    n = 12
    name = shard_name(1, n)
    left = [_touch(layout.shards_dir / f".{name}.lmdb.tmp-node7-123", True),
            _touch(layout.shards_dir / f".{name}.lmdb.old-node7-123", True),
            _touch(layout.shards_dir / f".{name}.done.tmp-node7-123", False),
            _touch(layout.shards_dir / f"..{name}.partial.lmdb.tmp-node7-99", True)]
    # killed between the two renames of the partial store: the earlier partial is put back
    old_partial = _touch(layout.shards_dir / f"..{name}.partial.lmdb.old-node7-99", True)
    others = [_touch(layout.shards_dir / f".{shard_name(i, n)}.lmdb.tmp-node{i}-5", True)
              for i in (0, 10, 11)]  # other tasks' copies in progress
    kept = [_touch(layout.shard_store(0, n), True), _touch(layout.shard_marker(0, n), False)]
    handled = remove_temporaries(layout, 1, n)
    assert sorted(handled) == sorted(p.name for p in left + [old_partial])
    assert not any(p.exists() for p in left + [old_partial])
    assert (layout.partial_store(1, n) / "data.mdb").read_bytes() == b"x"
    assert all(p.exists() for p in others + kept)
    assert remove_temporaries(layout, 1, n) == []
    # a partial store in place: an old copy of it is removed, the partial kept
    stale = _touch(layout.shards_dir / f"..{name}.partial.lmdb.old-node8-7", True)
    assert remove_temporaries(layout, 1, n) == [stale.name]
    assert not stale.exists() and layout.partial_store(1, n).exists()
