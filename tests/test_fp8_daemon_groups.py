"""``serve --precision fp8`` with small files sharing one run (``--group-files``): the fidelity
guard measures the group's input together; a group it accepts completes as one run with the
guard in every file's job record, and a group it refuses (before anything is written) is
split: each file runs alone, judged on its own input, so only a file refused on its own goes
to failed/ (kind fidelity, no attempt counted, no retry).

The daemon runs the real engine (real LMDB store, real guard) with the CPU's eager FP8 path
(``fp8_helpers.cpu_fp8_factory``); this input's guard cosines are in test_fp8 (plain 0.99922,
stress 0.99083 over all 40 proteins), so 0.995 accepts the plain weights and refuses the stress
weights on the group."""

from __future__ import annotations

import json
import os

from conftest import random_proteins
from gpuengine.daemon import Daemon, is_ignored
from fp8_helpers import fp8_daemon, needs_cpu_fp8, weights  # noqa: F401  (fixture)

THRESHOLD = 0.995


def _files() -> dict[str, str]:
    """The 40 proteins of test_fp8's guard tests, in four files of ten."""
    seqs = random_proteins([30 + 7 * i for i in range(40)], seed=5)
    return {f"g{k}.fa": "".join(f">p{i}\n{seqs[i]}\n" for i in range(10 * k, 10 * k + 10))
            for k in range(4)}


def _daemon(tmp_path, checkpoint) -> Daemon:
    daemon = fp8_daemon(tmp_path, checkpoint, THRESHOLD)
    daemon.warm_up()  # the replicas every run reuses (its one record passes the guard)
    daemon.job.check_store()
    return daemon


def _recover(daemon: Daemon, files: dict[str, str]) -> None:
    try:
        for name, text in files.items():
            (daemon.processing / name).write_text(text)
        daemon.recover()
    finally:
        daemon._unlock()


def _done(daemon: Daemon) -> dict[str, dict]:
    return {n: json.loads((daemon.done / f"{n}.job.json").read_text())
            for n in os.listdir(daemon.done) if not n.endswith(".job.json") and not is_ignored(n)}


@needs_cpu_fp8
def test_a_group_the_guard_accepts_is_one_run_with_the_guard_in_every_job(
        weights, tmp_path):  # noqa: F811
    daemon = _daemon(tmp_path, weights["plain"])
    files = _files()
    _recover(daemon, files)
    done = _done(daemon)
    assert sorted(done) == sorted(files) and os.listdir(daemon.failed) == []
    assert len({job["engine_run"]["run_id"] for job in done.values()}) == 1, "one run"
    guards = [job["fidelity"] for job in done.values()]
    assert all(g == guards[0] for g in guards), "the group's one measurement"
    assert guards[0]["passed"] and guards[0]["sequences"] == 40
    assert THRESHOLD <= guards[0]["min_cosine"] < 0.99999


@needs_cpu_fp8
def test_a_group_the_guard_refuses_runs_each_file_alone(weights, tmp_path):  # noqa: F811
    daemon = _daemon(tmp_path, weights["stress"])
    files = _files()
    _recover(daemon, files)
    done = _done(daemon)
    failed = sorted(n for n in os.listdir(daemon.failed) if not n.endswith(".error.json"))
    assert sorted([*done, *failed]) == sorted(files) and failed, (done, failed)
    for name in failed:  # refused on its own input: at once, no attempt spent, no retry
        record = json.loads((daemon.failed / f"{name}.error.json").read_text())
        assert record["kind"] == "fidelity" and f"threshold {THRESHOLD}" in record["reason"]
        assert name not in daemon.retry_at
    for job in done.values():  # accepted on its own input, in a run of its own
        assert job["fidelity"]["passed"] and job["fidelity"]["sequences"] == 10
        assert job["fidelity"]["min_cosine"] >= THRESHOLD and "group" not in job
    assert len({job["engine_run"]["run_id"] for job in done.values()}) == len(done)
    assert json.loads((daemon.dir / "attempts.json").read_text())["files"] == {}
