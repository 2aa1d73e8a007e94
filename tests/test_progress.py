"""What a user watches: the progress bar (fresh and resumed runs end at total/total, 100 %,
without an ETA) and the summary's rates (one definition of tokens/s, so a single device's row
equals the run's headline). Real runs of the tiny random ESM-2 on the CPU, a real LMDB."""

from __future__ import annotations

import io
import re
import threading
import time

import pytest
from rich.console import Console

from conftest import random_proteins, write_fasta
from gpuengine.progress import ProgressSink, ProgressSnapshot
from run_stops import WAIT_SECONDS, stopped_after_first_commit

N = 60
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Recording(ProgressSink):
    """Keeps every snapshot; ``stored_shown`` is set once a snapshot counts ``expect_stored``
    records as already stored."""

    def __init__(self, expect_stored: int = -1):
        self.snapshots: list[ProgressSnapshot] = []
        self.started: tuple[int, int] | None = None
        self.closed = False
        self.expect_stored, self.stored_shown = expect_stored, threading.Event()

    def start(self, total_records, total_residues):
        self.started = (total_records, total_residues)

    def update(self, snapshot):
        assert not self.closed, "an update after close"
        self.snapshots.append(snapshot)
        if snapshot.stored_records == self.expect_stored:
            self.stored_shown.set()

    def close(self):
        self.closed = True


@pytest.fixture
def fasta(tmp_path):
    seqs = random_proteins([10 + (i * 7) % 50 for i in range(N)], seed=5)
    return write_fasta(tmp_path / "p.fa", [(f"p{i}", s) for i, s in enumerate(seqs)])


def _config(fasta, model, out, **extra):
    from gpuengine.config import EmbedConfig

    # small batches and groups: a run makes many commits, so a stop lands part way
    return EmbedConfig(inputs=(fasta,), model=str(model), out=out, max_tokens=96,
                       commit_every=4, **extra)


def _interrupted(fasta, model, out):
    """A real run stopped after its first commit (see run_stops), with most records left."""
    from gpuengine.engine import run_embed

    stop = threading.Event()
    with stopped_after_first_commit(stop):
        first = run_embed(_config(fasta, model, out), Recording(), stop)
    assert first.interrupted and 0 < first.committed_records < N, first.committed_records
    return first


def _resumed(fasta, model, out, first, sink):
    """The same run again (resumed)."""
    from gpuengine.engine import run_embed

    resumed = run_embed(_config(fasta, model, out), sink)
    assert resumed.run_started["resumes"] == 1 and not resumed.interrupted
    assert resumed.already_stored == first.committed_records
    return resumed


def _check_snapshots(sink: Recording, stored: int) -> None:
    snaps = sink.snapshots
    assert sink.started == (N, sink.started[1]) and sink.closed and snaps
    done = [s.done_records for s in snaps]
    assert done == sorted(done), "the bar went backwards"
    assert all(s.total_records == N for s in snaps)
    last = snaps[-1]
    assert (last.done_records, last.stored_records, last.committed_records) == (N, stored, N - stored)
    assert last.failed_records == 0
    assert max(s.committed_records for s in snaps) == N - stored  # this run's part only


def test_recorded_progress_of_a_fresh_run_ends_at_the_total(fasta, tiny_pt, tmp_path):
    from gpuengine.engine import run_embed

    sink = Recording()
    summary = run_embed(_config(fasta, tiny_pt, tmp_path / "s.lmdb"), sink)
    assert summary.committed_records == N
    _check_snapshots(sink, stored=0)


def test_recorded_progress_of_a_resumed_run_starts_at_what_is_stored(fasta, tiny_pt, tmp_path,
                                                                    monkeypatch):
    from gpuengine.committer import Committer

    out = tmp_path / "s.lmdb"
    first = _interrupted(fasta, tiny_pt, out)
    sink = Recording(expect_stored=first.committed_records)
    real_commit = Committer._commit

    def commit_once_the_stored_records_are_shown(self, *args, **kwargs):
        # this run's first commit waits for a snapshot that counts the stored records (a
        # 60-record run can otherwise be done before the loop's first report, 0.1 s apart);
        # a bound, not a pace: the snapshot never comes if stored records are not reported
        sink.stored_shown.wait(WAIT_SECONDS)
        real_commit(self, *args, **kwargs)

    monkeypatch.setattr(Committer, "_commit", commit_once_the_stored_records_are_shown)
    _resumed(fasta, tiny_pt, out, first, sink)
    _check_snapshots(sink, stored=first.committed_records)
    # the stored records count as soon as the planner has found them, before this run's own
    # commits are done (the issue: 9226/20000 at the end of a resumed run of 20 000)
    assert any(s.stored_records == first.committed_records and s.committed_records < N - s.stored_records
               for s in sink.snapshots)


def _final_frame(text: str) -> str:
    """The main row of the last frame rich drew (frames start with a carriage return)."""
    frame = text.rsplit("\r", 1)[-1]
    return ANSI.sub("", frame).strip()


def _rich(width: int = 160):
    from gpuengine.display import RichProgress

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=width, color_system=None)
    return RichProgress(console=console), buf


def test_bar_of_a_fresh_run_shows_total_of_total_100_percent_and_no_eta(fasta, tiny_pt, tmp_path):
    from gpuengine.engine import run_embed

    progress, buf = _rich()
    run_embed(_config(fasta, tiny_pt, tmp_path / "s.lmdb"), progress)
    last = _final_frame(buf.getvalue())
    assert f"{N}/{N}" in last and "100%" in last and "ETA" not in last, last
    assert "already stored" not in last


def test_bar_of_a_resumed_run_shows_total_of_total_100_percent_and_no_eta(fasta, tiny_pt, tmp_path):
    out = tmp_path / "s.lmdb"
    first = _interrupted(fasta, tiny_pt, out)
    progress, buf = _rich()
    _resumed(fasta, tiny_pt, out, first, progress)
    last = _final_frame(buf.getvalue())
    assert f"{N}/{N}" in last and "100%" in last and "ETA" not in last, last
    assert f"({first.committed_records} already stored)" in last


def test_eta_counts_only_this_runs_commits():
    from gpuengine.display import RichProgress

    progress = RichProgress(enabled=False)

    def snap(t, committed, stored=0):
        return ProgressSnapshot(committed, 1000, 0, t, stored_records=stored)

    assert progress.eta(snap(1.0, 0)) == "ETA -:--:--"  # no rate yet
    # 900 stored records found at once must not count as speed: 10 records/s of this run's
    assert progress.eta(snap(2.0, 10, stored=900)) == "ETA 0:00:09"  # 90 left at 10/s
    assert progress.eta(snap(11.0, 100, stored=900)) == ""  # done: no ETA


def test_eta_follows_the_recent_rate():
    from gpuengine.display import RichProgress

    progress = RichProgress(enabled=False, eta_window=10.0)
    for t in range(0, 21):  # 10 records/s for 20 s, then 1 record/s
        progress.eta(ProgressSnapshot(10 * t, 10_000, 0, float(t)))
    for t in range(21, 41):
        eta = progress.eta(ProgressSnapshot(200 + (t - 20), 10_000, 0, float(t)))
    assert eta == f"ETA 2:43:00"  # 9780 left at 1/s, the last 10 s only


# ----------------------------------------------------------------------------- summary rates


def test_runner_cpu_time_of_a_batch_excludes_the_next_ones(tiny_pt):
    """With two batches in flight, the first one's time is its own compute, not the time
    until it is finished (which covers the second's compute too and counted it twice)."""
    import torch

    from gpuengine.models.registry import family
    from gpuengine.models.sources import resolve
    from gpuengine.runner import Runner
    from gpuengine.store.schema import OutputSpec

    source = resolve(str(tiny_pt), allow_download=False)
    fam = family(source.family)
    model = fam.build(fam.read(source), torch.float32)
    runner = Runner(model, torch.device("cpu"), "fp32", (OutputSpec(2, "mean"),), fam.pooling_rule)
    small, large = runner.synthetic_items(64, length=32), runner.synthetic_items(4096, length=256)
    t0 = time.perf_counter()
    first = runner.launch(runner.stage(small))
    t1 = time.perf_counter()
    second = runner.launch(runner.stage(large))
    t2 = time.perf_counter()
    a, b = runner.finish(first), runner.finish(second)
    # the large batch computed after t1 (a CPU launch is synchronous) and the first batch was
    # finished after it: a time counted until finish would be at least t2 - t0 > t1 - t0
    assert 0 < a.seconds <= t1 - t0 and 0 < b.seconds <= t2 - t1


def test_summary_device_row_equals_the_headline_on_one_device(fasta, tiny_pt, tmp_path):
    from gpuengine.display import print_summary
    from gpuengine.engine import run_embed

    summary = run_embed(_config(fasta, tiny_pt, tmp_path / "s.lmdb"))
    (device,) = summary.devices
    assert device["tokens"] == summary.tokens > 0
    assert device["tokens_per_second"] == pytest.approx(summary.tokens_per_second, rel=1e-9)
    # busy time is the batches' compute, counted once: never more than the embedding time
    # (with two batches in flight it used to be about twice that, shown as "busy 100 %")
    assert 0 < device["busy_seconds"] <= summary.embed_seconds
    assert device["busy_fraction"] == pytest.approx(device["busy_seconds"] / summary.embed_seconds)
    buf = io.StringIO()
    print_summary(summary, Console(file=buf, width=200, color_system=None))
    text = buf.getvalue()
    headline = re.search(r"tokens/s \(tokens ÷ embedding time\)\s*│\s*([\d,]+)", text).group(1)
    row = re.search(r"cpu\s*│.*?([\d,]+) tok/s, busy (\d+)%", text)
    assert row.group(1) == headline, text
    assert "devices' rates add up to the run's" in text


def test_device_rates_add_up_to_the_headline(fasta, tiny_pt, tmp_path, monkeypatch):
    """Two replicas (both on the CPU): the rows share the headline's time base."""
    import torch

    from gpuengine import engine, replicas

    monkeypatch.setattr(replicas, "parse_devices", lambda spec: [torch.device("cpu")] * 2)
    summary = engine.run_embed(_config(fasta, tiny_pt, tmp_path / "s.lmdb"))
    assert len(summary.devices) == 2
    assert sum(d["tokens"] for d in summary.devices) == summary.tokens
    assert sum(d["tokens_per_second"] for d in summary.devices) == pytest.approx(
        summary.tokens_per_second, rel=1e-9)
    for d in summary.devices:
        assert d["busy_seconds"] <= summary.embed_seconds
