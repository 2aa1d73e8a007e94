"""The SLURM behaviour gpuengine's cluster mode relies on, checked on a real cluster (the one-host
cluster of tools/slurm_local.sh in CI): job arrays with per-task $TMPDIR, an afterok job that
joins them, what scancel and a failing task leave behind, and how a resumed array is joined."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slurm

# An array task: announces itself, waits for `release` (if the test asks), writes its part in the
# job's node-local $TMPDIR and moves it to the shared directory, as a shard will.
TASK = """#!/bin/bash
set -eu
shared={shared}
echo "$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT $SLURM_ARRAY_JOB_ID $SLURM_JOB_ID $TMPDIR" \\
    > "$shared/env_$SLURM_ARRAY_TASK_ID"
touch "$shared/started_$SLURM_ARRAY_TASK_ID"
for _ in $(seq 600); do [ -e "$shared/release" ] && break; sleep 0.2; done
[ -e "$shared/release" ]
[ "$SLURM_ARRAY_TASK_ID" = "{fail_task}" ] && exit 3
echo "part $SLURM_ARRAY_TASK_ID" > "$TMPDIR/part"
mv "$TMPDIR/part" "$shared/part_$SLURM_ARRAY_TASK_ID"
"""
JOIN = """#!/bin/bash
set -eu
cat {shared}/part_0 {shared}/part_1 {shared}/part_2 {shared}/part_3 > {shared}/joined
"""
JOINED = "part 0\npart 1\npart 2\npart 3\n"


def submit_array(slurm, shared, fail_task="none", release=True):
    """Submit the 4-task array and its afterok join; returns (array id, join id)."""
    shared.mkdir(exist_ok=True)
    if release:
        (shared / "release").touch()
    array = slurm.submit(TASK.format(shared=shared, fail_task=fail_task), "--array=0-3",
                         "--job-name=shards", f"--output={shared}/task_%A_%a.log")
    join = slurm.submit(JOIN.format(shared=shared), f"--dependency=afterok:{array}",
                        "--job-name=join", f"--output={shared}/join_%j.log")
    return array, join


def test_array_then_afterok_join(slurm, tmp_path):
    shared = tmp_path / "shared"
    array, join = submit_array(slurm, shared)
    jobs = slurm.wait(array, join, timeout=120)

    assert {j.id: j.state for j in jobs.values()} == {
        **{f"{array}_{i}": "COMPLETED" for i in range(4)}, join: "COMPLETED"}
    assert (shared / "joined").read_text() == JOINED
    for i in range(4):  # --output landed where asked; each task had its own existing $TMPDIR
        assert (shared / f"task_{array}_{i}.log").exists()
        task, count, array_id, job_id, tmpdir = (shared / f"env_{i}").read_text().split()
        assert (task, count, array_id) == (str(i), "4", array)
        assert tmpdir.endswith(f"job_{job_id}")
    tmpdirs = {(shared / f"env_{i}").read_text().split()[4] for i in range(4)}
    assert len(tmpdirs) == 4
    if slurm.has_sacct:  # accounting agrees once slurmctld has reported the jobs to slurmdbd
        def all_completed():
            acct = slurm.accounting(array, join)
            return len(acct) == 5 and all(j.state == "COMPLETED" for j in acct.values()) and acct

        done = slurm.wait_until(all_completed, timeout=30, what="sacct shows 5 jobs COMPLETED")
        assert set(done) == {f"{array}_{i}" for i in range(4)} | {join}


@pytest.mark.slow
def test_scancel_task_blocks_afterok_until_resubmitted(slurm, tmp_path):
    """scancel of a running array task: the task ends CANCELLED, the afterok join stays PENDING
    with reason DependencyNeverSatisfied (SLURM does not cancel it), and re-pointing the join's
    dependency at a resubmission of the missing task lets it run (the resume path)."""
    shared = tmp_path / "shared"
    array, join = submit_array(slurm, shared, release=False)
    try:
        slurm.wait_until(lambda: (shared / "started_1").exists(), what="task 1 running")
        assert slurm.jobs(f"{array}_1")[f"{array}_1"].state == "RUNNING"
        slurm.cancel(f"{array}_1")
        (shared / "release").touch()
        jobs = slurm.wait(array, join, timeout=120)

        assert jobs[f"{array}_1"].state == "CANCELLED"
        assert jobs[f"{array}_1"].exit_code == "0:15"  # killed by SIGTERM
        assert all(jobs[f"{array}_{i}"].state == "COMPLETED" for i in (0, 2, 3))
        assert jobs[join].state == "PENDING" and jobs[join].reason == "DependencyNeverSatisfied"
        assert jobs[join].never_runs
        assert not (shared / "part_1").exists() and not (shared / "joined").exists()
        if slurm.has_sacct:
            slurm.wait_until(lambda: slurm.accounting(array).get(f"{array}_1", None),
                             what="sacct knows task 1")
            assert slurm.accounting(array)[f"{array}_1"].state == "CANCELLED"

        retry = slurm.submit(TASK.format(shared=shared, fail_task="none"), "--array=1",
                             f"--output={shared}/retry_%A_%a.log")
        slurm.run("scontrol", "update", f"JobId={join}", f"Dependency=afterok:{retry}")
        jobs = slurm.wait(retry, join, timeout=120)
        assert jobs[f"{retry}_1"].state == "COMPLETED" and jobs[join].state == "COMPLETED"
        assert (shared / "joined").read_text() == JOINED
    finally:
        (shared / "release").touch()
        slurm.run("scancel", array, join, check=False)


def test_scancel_pending_task_leaves_no_record(slurm, tmp_path):
    """scancel of an array task that has not started yet: the task vanishes (neither scontrol
    nor sacct lists it afterwards; only a missing done marker shows it), the afterok join can
    never run, and with --kill-on-invalid-dep=yes SLURM cancels the join itself."""
    shared = tmp_path / "shared"
    shared.mkdir()
    array = slurm.submit(TASK.format(shared=shared, fail_task="none"), "--array=0-3%1",
                         f"--output={shared}/task_%A_%a.log")
    join = slurm.submit(JOIN.format(shared=shared), f"--dependency=afterok:{array}",
                        "--kill-on-invalid-dep=yes", "--output=/dev/null")
    try:
        slurm.wait_until(lambda: (shared / "started_0").exists(), what="task 0 running")
        slurm.cancel(f"{array}_3")
        (shared / "release").touch()
        jobs = slurm.wait(array, join, timeout=120)
        assert {j.id: j.state for j in jobs.values()} == {
            **{f"{array}_{i}": "COMPLETED" for i in range(3)}, join: "CANCELLED"}
        assert jobs[join].reason == "DependencyNeverSatisfied"
        assert not (shared / "started_3").exists()
        if slurm.has_sacct:
            assert f"{array}_3" not in slurm.accounting(array)
    finally:
        (shared / "release").touch()
        slurm.run("scancel", array, join, check=False)


def test_failed_task_blocks_afterok_but_not_afterany(slurm, tmp_path):
    shared = tmp_path / "shared"
    array, join = submit_array(slurm, shared, fail_task="2")
    try:
        anyway = slurm.submit("#!/bin/bash\ntrue\n", f"--dependency=afterany:{array}",
                              "--output=/dev/null")
        jobs = slurm.wait(array, join, anyway, timeout=120)
        assert jobs[f"{array}_2"].state == "FAILED"
        assert jobs[f"{array}_2"].exit_code == "3:0"
        assert jobs[f"{array}_2"].reason == "NonZeroExitCode"
        assert jobs[join].never_runs and not (shared / "joined").exists()
        assert jobs[anyway].state == "COMPLETED"
    finally:
        slurm.run("scancel", join, check=False)


def test_gpu_requests(slurm, tmp_path):
    """--gres=gpu:K is granted up to the node's count (the one-host cluster has fake GPUs and
    sets CUDA_VISIBLE_DEVICES) and refused at submission above it, differently on a cluster
    without any GPU gres."""
    per_node = slurm.gpus_per_node
    out = tmp_path / "gpu.txt"
    script = "#!/bin/bash\necho \"${CUDA_VISIBLE_DEVICES-unset} ${SLURM_GPUS_ON_NODE-unset}\"\n"
    if per_node:
        job = slurm.submit(script, f"--gres=gpu:{per_node}", f"--output={out}")
        assert slurm.wait(job)[job].state == "COMPLETED"
        devices, count = out.read_text().split()
        assert devices == ",".join(map(str, range(per_node))) and count == str(per_node)
    refusal = ("Requested node configuration is not available" if per_node
               else "Invalid generic resource")
    with pytest.raises(RuntimeError, match=refusal):
        slurm.submit(script, f"--gres=gpu:{per_node + 1}", "--output=/dev/null")
