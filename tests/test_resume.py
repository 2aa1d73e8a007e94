"""Resuming: a real ``gpuengine embed`` process killed with SIGKILL, or stopped with SIGINT,
in the middle of a run leaves a consistent store, and rerunning the same command finishes it
without embedding anything twice.

The input is 3000 short proteins (every tenth id repeats an earlier sequence) embedded with
``--max-tokens 256`` (about a thousand batches). The engine commits a group every 0.5 s or
2048 sequences (``EmbedConfig.commit_every``; the CLI does not expose it), so a run on a CPU
makes several transactions and the first one can never hold every record. The processes and
the checks are in embed_processes.py; the input is conftest's ``resume_workload``.
"""

from __future__ import annotations

import json
import signal

import pytest

from embed_processes import (N, check_store, command, interrupt, kill_after_first_commit,
                             rerun_to_completion, run_records)
from held_process import BATCHES

pytestmark = pytest.mark.slow


def test_sigkill_mid_run_then_rerun(tiny_pt, tmp_path, resume_workload):
    out = tmp_path / "store.lmdb"
    cmd = command(resume_workload["fasta"], tiny_pt, out)
    proc, _ = kill_after_first_commit(cmd, out, tmp_path / "killed")
    assert proc.returncode == -signal.SIGKILL

    ids = check_store(out, resume_workload)
    stored = len(ids)
    print(f"{stored} of {N} records stored at the kill")
    assert 0 < stored < N, f"{stored} of {N} records stored at the kill"
    [run] = run_records(out)
    assert run["status"] == "running" and run["committed_records"] == stored

    summary = rerun_to_completion(cmd, out, stored, resume_workload)
    assert summary["embedded"] + summary["deduplicated"] == N - stored
    [run] = run_records(out)  # the same run, resumed
    assert run["status"] == "complete" and run["resumes"] == 1
    assert run["committed_records"] == N


def test_sigint_mid_run_exits_130_then_rerun(tiny_pt, tmp_path, resume_workload):
    out = tmp_path / "store.lmdb"
    cmd = command(resume_workload["fasta"], tiny_pt, out)
    interrupt(cmd, out, tmp_path / "interrupted", [signal.SIGINT])
    summary = json.loads((tmp_path / "interrupted.out").read_text())
    assert summary["interrupted"] is True and summary["exit_code"] == 130
    assert "stopping" in (tmp_path / "interrupted.err").read_text()
    # held (embed_processes.start): its first batches and the held one, drained at the stop
    assert sum(d["batches"] for d in summary["devices"]) == BATCHES + 1

    ids = check_store(out, resume_workload)
    stored = len(ids)
    print(f"{stored} of {N} records stored at the interruption")
    assert stored == summary["committed_records"] > 0
    [run] = run_records(out)
    assert run["status"] == "interrupted" and run["committed_records"] == stored

    if stored < N:
        rerun_to_completion(cmd, out, stored, resume_workload)
        [run] = run_records(out)
        assert run["status"] == "complete" and run["committed_records"] == N


def test_sigterm_drains_like_ctrl_c(tiny_pt, tmp_path, resume_workload):
    out = tmp_path / "store.lmdb"
    interrupt(command(resume_workload["fasta"], tiny_pt, out), out, tmp_path / "term", [signal.SIGTERM])
    summary = json.loads((tmp_path / "term.out").read_text())
    assert summary["interrupted"] is True
    assert len(check_store(out, resume_workload)) == summary["committed_records"] > 0
    [run] = run_records(out)
    assert run["status"] == "interrupted"


def test_second_ctrl_c_leaves_a_consistent_store(tiny_pt, tmp_path, resume_workload):
    """A second Ctrl-C quits at once (os._exit(130)) unless the drain after the first one
    already ended; then it lands on the exiting interpreter, which dies of SIGINT (a shell
    shows that as 130 too). Either way the store holds only whole, correct records."""
    out = tmp_path / "store.lmdb"
    interrupt(command(resume_workload["fasta"], tiny_pt, out), out, tmp_path / "twice",
              [signal.SIGINT, signal.SIGINT], codes=(130, -signal.SIGINT))
    printed = (tmp_path / "twice.out").read_text()
    if printed:  # the drain won the race: a complete, interrupted summary
        assert json.loads(printed)["interrupted"] is True
    assert 0 < len(check_store(out, resume_workload)) <= N
