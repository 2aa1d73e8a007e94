"""What a user watches: the summary's rates (one definition of tokens/s, so a single device's
row equals the run's headline). Real runs of the tiny random ESM-2 on the CPU, a real LMDB."""

from __future__ import annotations

import io
import re
import time

import pytest
from rich.console import Console

from conftest import random_proteins, write_fasta

N = 60


@pytest.fixture
def fasta(tmp_path):
    seqs = random_proteins([10 + (i * 7) % 50 for i in range(N)], seed=5)
    return write_fasta(tmp_path / "p.fa", [(f"p{i}", s) for i, s in enumerate(seqs)])


def _config(fasta, model, out, **extra):
    from gpuengine.config import EmbedConfig

    # small batches and groups: a run makes many commits, so a stop lands part way
    return EmbedConfig(inputs=(fasta,), model=str(model), out=out, max_tokens=96,
                       commit_every=4, **extra)


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
    assert 0 < a.seconds <= t1 - t0 and 0 < b.seconds <= t2 - t1
    assert a.seconds < t2 - t1  # it did not take the large batch's time


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

    from gpuengine import engine

    monkeypatch.setattr(engine, "parse_devices", lambda spec: [torch.device("cpu")] * 2)
    summary = engine.run_embed(_config(fasta, tiny_pt, tmp_path / "s.lmdb"))
    assert len(summary.devices) == 2
    assert sum(d["tokens"] for d in summary.devices) == summary.tokens
    assert sum(d["tokens_per_second"] for d in summary.devices) == pytest.approx(
        summary.tokens_per_second, rel=1e-9)
    for d in summary.devices:
        assert d["busy_seconds"] <= summary.embed_seconds
