"""The real engine (:func:`gpuengine.engine.run_embed`) on the CPU with fake runners that wrap a
real :class:`~gpuengine.runner.Runner` (real vectors) and inject out-of-memory errors, a
non-finite embedding, an item that never fits, a failing launch or finish, and a dying replica
(two CPU replicas stand in for two GPUs); stores are compared with a clean run.

The scheduler alone, under simulated devices, is tested in test_scheduler.py.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import digests
from gpuengine.config import EmbedConfig, Environment
from gpuengine.engine import run_embed
from gpuengine.errors import EXIT_OK, EXIT_PARTIAL, GpuEngineError
from gpuengine.models.registry import family
from gpuengine.models.sources import resolve
from gpuengine.runner import DTYPES, Runner
from gpuengine.store.codec import sequence_digest
from gpuengine.store.reader import EmbeddingStore
from gpuengine.synthetic import write_fair_esm_checkpoint

N_RECORDS = 240
MAX_TOKENS = 512
THREADS = 1
"""One torch thread: two OpenMP threads spin-wait badly on a loaded 2-core machine (seconds per
run instead of a quarter of one). The engine sets it process-wide; :func:`_torch_threads` restores it."""
AMINO = "ACDEFGHIKLMNPQRSTVWY"


@dataclass
class Corpus:
    root: Path
    checkpoint: Path
    fasta: Path
    records: list[tuple[str, str]]
    env: Environment
    weights: object
    clean: dict[str, np.ndarray]
    """id → vector from a clean run with the real runner."""

    @property
    def digest_ids(self) -> dict[bytes, list[str]]:
        out: dict[bytes, list[str]] = {}
        for rid, seq in self.records:
            out.setdefault(sequence_digest(seq), []).append(rid)
        return out

    @property
    def distinct_tokens(self) -> int:
        return sum(len(seq) + 2 for seq in {s for _, s in self.records})

    def config(self, out: Path, **kw) -> EmbedConfig:
        kw.setdefault("max_tokens", MAX_TOKENS)
        kw.setdefault("commit_every", 32)
        kw.setdefault("threads", THREADS)
        return EmbedConfig(inputs=(self.fasta,), model=str(self.checkpoint), out=out,
                           devices="cpu", env=self.env, **kw)


def read_store(path: Path) -> dict[str, np.ndarray]:
    with EmbeddingStore(path) as store:
        ids = list(store.ids())
        assert len(ids) == len(set(ids)) == len(store), "an id is stored twice"
        vectors = dict(store.items())
    assert all(np.isfinite(v).all() for v in vectors.values()), "a non-finite vector is stored"
    return vectors


def assert_matches_clean(corpus: Corpus, stored: dict[str, np.ndarray]) -> None:
    worst = max(float(np.abs(v - corpus.clean[rid]).max()) for rid, v in stored.items())
    assert worst <= 1e-6, f"max |diff| to the clean run {worst:.3g}"


def assert_counts(corpus: Corpus, summary, failed_ids=()) -> None:
    ids_of = corpus.digest_ids
    n, distinct = len(corpus.records), len(ids_of)
    failed_digests = {sequence_digest(seq) for rid, seq in corpus.records if rid in failed_ids}
    s = summary
    assert s.records_read == s.valid_records == n
    assert (s.invalid_skipped, s.duplicate_records, s.already_stored, s.truncated) == (0, 0, 0, 0)
    assert sorted(rid for rid, _ in s.failed) == sorted(failed_ids)
    assert s.committed_records == n - len(failed_ids)
    assert s.embedded == distinct - len(failed_digests)
    assert s.deduplicated == n - distinct
    assert s.committed_records + len(s.failed) == s.valid_records
    assert s.tokens == sum(d["tokens"] for d in s.devices)
    assert s.exit_code == (EXIT_PARTIAL if failed_ids else EXIT_OK)


@pytest.fixture(autouse=True)
def _torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    threads = torch.get_num_threads()
    try:
        return _make_corpus(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _make_corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("engine")
    checkpoint = write_fair_esm_checkpoint(root / "esm2_t2_tiny.pt", 2, 64, 4, seed=3)
    rng = random.Random(11)
    sequences = ["".join(rng.choice(AMINO) for _ in range(rng.randint(4, 160)))
                 for _ in range(N_RECORDS - 12)]
    records = [(f"p{i:03d}", seq) for i, seq in enumerate(sequences)]
    records += [(f"dup{i:02d}", sequences[i * 7]) for i in range(12)]  # same sequence, another id
    rng.shuffle(records)
    fasta = root / "in.fa"
    fasta.write_text("".join(f">{rid}\n{seq}\n" for rid, seq in records))
    env = Environment(offline=True, cache_dir=root / "cache")
    source = resolve(str(checkpoint), allow_download=False)
    weights = family(source.family).read(source)
    c = Corpus(root, checkpoint, fasta, records, env, weights, {})
    summary = run_embed(c.config(root / "clean"))
    assert_counts(c, summary)
    c.clean = read_store(root / "clean")
    assert set(c.clean) == {rid for rid, _ in records}
    return c


class Faults:
    """What the fake runners inject; shared by every replica of one run."""

    def __init__(self):
        self.lock = threading.Lock()
        self.launches: list[tuple[int, tuple[bytes, ...]]] = []
        self.finished_batches: list[tuple[bytes, ...]] = []
        self.ooms = 0

    def before_launch(self, runner: FakeRunner, staged) -> None:
        """Raise here to inject an error from ``launch``."""

    def poison_rows(self, runner: FakeRunner, staged) -> tuple[int, int] | None:
        """Rows of the packed batch to set to NaN after the forward (a non-finite item)."""
        return None

    def on_release(self, runner: FakeRunner) -> None:
        pass


class PoisonModel:
    """Calls the real model, then writes NaN into the chosen rows of every representation."""

    def __init__(self, model):
        self.model = model
        self.rows: tuple[int, int] | None = None

    def __call__(self, ids, layout, layers, attention):
        out = self.model(ids, layout, layers, attention)
        if self.rows is not None:
            for tensor in out.values():
                tensor[self.rows[0]:self.rows[1]] = float("nan")
        return out


class FakeRunner:
    """A real CPU :class:`Runner` (real vectors) with injected faults."""

    cuda = False

    def __init__(self, real: Runner, index: int, faults: Faults):
        self.real, self.index, self.faults = real, index, faults
        self.device, self.padded, self.precision = real.device, real.padded, real.precision
        self.poison = PoisonModel(real.model)
        real.model = self.poison

    def stage(self, items):
        return self.real.stage(items)

    def launch(self, staged):
        with self.faults.lock:
            self.faults.launches.append((self.index, digests(staged.items)))
        self.faults.before_launch(self, staged)
        self.poison.rows = self.faults.poison_rows(self, staged)
        try:
            return self.real.launch(staged)
        finally:
            self.poison.rows = None

    def finish(self, launched):
        result = self.real.finish(launched)
        with self.faults.lock:
            self.faults.finished_batches.append(digests(launched.staged.items))
        return result

    def release_cached_memory(self):
        self.faults.on_release(self)
        self.real.release_cached_memory()


def factory(corpus: Corpus, faults: Faults, cls=None):
    fam = family("esm2")
    cls = cls or FakeRunner
    made = []

    def make(device, precision, outputs):
        model = fam.build(corpus.weights, DTYPES[precision])
        runner = cls(Runner(model, device, precision, outputs, fam.pooling_rule), len(made), faults)
        made.append(runner)
        return runner
    make.made = made
    return make


@pytest.fixture
def two_cpu_replicas(monkeypatch):
    from gpuengine import replicas

    monkeypatch.setattr(replicas, "parse_devices", lambda spec: [torch.device("cpu")] * 2)


class FirstBatchesOOM(Faults):
    """The first ``k`` launches of batches of at least ``min_items`` items run out of memory
    (each OOM lowers the device's budget to 70 %, so a size threshold would stop firing)."""

    def __init__(self, k: int, min_items: int = 2):
        super().__init__()
        self.k, self.min_items = k, min_items

    def before_launch(self, runner, staged):
        with self.lock:
            hit = self.ooms < self.k and len(staged.items) >= self.min_items
            if hit:
                self.ooms += 1
        if hit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated, {staged.total} tokens)")


@pytest.mark.parametrize("replicas", [1, 2])
def test_engine_recovers_from_injected_ooms(corpus, tmp_path, request, replicas):
    if replicas == 2:
        request.getfixturevalue("two_cpu_replicas")
    faults = FirstBatchesOOM(k=4)
    make = factory(corpus, faults)
    summary = run_embed(corpus.config(tmp_path / "s"), runner_factory=make)
    assert faults.ooms == 4
    assert len(make.made) == replicas and len(summary.devices) == replicas
    assert sum(d["oom_events"] for d in summary.devices) == 4
    assert_counts(corpus, summary)
    assert summary.tokens == corpus.distinct_tokens  # OOM'd batches are not counted as done
    stored = read_store(tmp_path / "s")
    assert set(stored) == set(corpus.clean)
    assert_matches_clean(corpus, stored)
    # every sequence was finished exactly once, whatever was split
    finished = [d for batch in faults.finished_batches for d in batch]
    assert sorted(finished) == sorted(corpus.digest_ids)
    if replicas == 2:
        assert all(d["batches"] > 0 for d in summary.devices)


def test_engine_fails_a_non_finite_sequence_loudly(corpus, tmp_path):
    # a sequence that also has an alias id: both ids must be reported
    target_seq = next(seq for rid, seq in corpus.records if rid == "dup03")
    target = sequence_digest(target_seq)
    failed_ids = corpus.digest_ids[target]
    assert len(failed_ids) == 2

    class NaN(Faults):
        def poison_rows(self, runner, staged):
            start = 0
            for item, n in zip(staged.items, staged.lengths_host):
                if item.digest == target:
                    return start, start + int(n)
                start += int(n)
            return None

    faults = NaN()
    summary = run_embed(corpus.config(tmp_path / "s"), runner_factory=factory(corpus, faults))
    assert summary.exit_code == EXIT_PARTIAL == 3
    assert_counts(corpus, summary, failed_ids)
    assert all("non-finite" in reason for _, reason in summary.failed)
    stored = read_store(tmp_path / "s")  # also: nothing non-finite stored
    assert set(stored) == set(corpus.clean) - set(failed_ids)
    assert_matches_clean(corpus, stored)
    # the other items of the poisoned batch were stored
    batch = next(d for _, d in faults.launches if target in d)
    assert len(batch) > 1


def test_engine_gives_up_an_item_that_never_fits(corpus, tmp_path):
    target_seq = next(seq for rid, seq in corpus.records if rid.startswith("p"))
    target = sequence_digest(target_seq)
    failed_ids = corpus.digest_ids[target]

    class NeverFits(Faults):
        def before_launch(self, runner, staged):
            if any(item.digest == target for item in staged.items):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    faults = NeverFits()
    summary = run_embed(corpus.config(tmp_path / "s"), runner_factory=factory(corpus, faults))
    assert_counts(corpus, summary, failed_ids)
    assert all("does not fit" in reason for _, reason in summary.failed)
    solo_tries = [d for _, d in faults.launches if d == (target,)]
    assert len(solo_tries) == 2  # max_solo_attempts, then given up: never retried forever
    stored = read_store(tmp_path / "s")
    assert set(stored) == set(corpus.clean) - set(failed_ids)
    assert_matches_clean(corpus, stored)




@pytest.mark.parametrize("replicas,where", [(1, "launch"), (2, "launch"),
                                            (1, "finish")])
def test_engine_stops_on_a_device_error_and_keeps_what_was_committed(corpus, tmp_path, request,
                                                                     replicas, where):
    if replicas == 2:
        request.getfixturevalue("two_cpu_replicas")
    bad_device = replicas - 1
    message = "CUDA error: an illegal memory access was encountered (simulated)"

    class Broken(Faults):
        failed = threading.Event()

        def before_launch(self, runner, staged):
            with self.lock:
                mine = sum(1 for dev, _ in self.launches if dev == runner.index)
            if runner.index == bad_device and mine > 4:
                self.failed.set()
                if where == "launch":
                    raise RuntimeError(message)
                runner.broken = True
            elif mine > 4:  # the good replica waits for the error: else, on a busy machine,
                # it could take every batch before the bad one has launched five
                assert self.failed.wait(60), "the bad replica never launched a fifth batch"

    class BrokenFinish(FakeRunner):
        broken = False

        def finish(self, launched):
            if self.broken:
                raise RuntimeError(message)
            return super().finish(launched)

    faults = Broken()
    make = factory(corpus, faults, BrokenFinish)
    out = tmp_path / "s"
    with pytest.raises(GpuEngineError) as info:
        run_embed(corpus.config(out, commit_every=8), runner_factory=make)
    text = str(info.value)
    assert f"device {bad_device}" in text and "illegal memory access" in text
    stored = read_store(out)
    assert stored and len(stored) < len(corpus.records)
    assert_matches_clean(corpus, stored)  # what was committed before the error is intact
    # only finished batches were committed, each one whole (with its aliases) or not at all
    ids_of = corpus.digest_ids
    finished = [d for batch in faults.finished_batches for d in batch]
    assert {rid for d in finished for rid in ids_of[d]} >= set(stored)
    for batch in faults.finished_batches:
        present = [rid in stored for d in batch for rid in ids_of[d]]
        assert all(present) or not any(present), "a batch was committed in part"
    # a rerun resumes: the rest is added, nothing twice
    summary = run_embed(corpus.config(out))
    assert summary.already_stored == len(stored) and not summary.failed
    final = read_store(out)
    assert set(final) == set(corpus.clean)
    assert_matches_clean(corpus, final)


@pytest.mark.parametrize("how", ["dies-recovering-from-oom", "dies-in-finish"])
def test_engine_requeues_the_batches_of_a_dead_device(corpus, tmp_path, two_cpu_replicas, how):
    """Replica 1 dies on its first batch (its worker exits with an error): either while it
    recovers from an out-of-memory error, or when the batch's results are collected. The engine
    calls device_lost, the batch goes back to the queue, and replica 0 does all the work."""

    class Dies(Faults):
        def before_launch(self, runner, staged):
            if runner.index == 1 and how == "dies-recovering-from-oom":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

        def on_release(self, runner):
            if runner.index == 1:
                raise RuntimeError("device fell off the bus (simulated)")

    class DiesInFinish(FakeRunner):
        def finish(self, launched):
            if self.index == 1 and how == "dies-in-finish":
                raise RuntimeError("CUDA error: unspecified launch failure (simulated)")
            return super().finish(launched)

    faults = Dies()
    summary = run_embed(corpus.config(tmp_path / "s"),
                        runner_factory=factory(corpus, faults, DiesInFinish))
    assert any(dev == 1 for dev, _ in faults.launches), "replica 1 never got a batch"
    assert_counts(corpus, summary)
    assert summary.devices[1]["batches"] == 0
    assert summary.devices[1]["oom_events"] == (how == "dies-recovering-from-oom")
    assert summary.devices[0]["sequences"] == len(corpus.digest_ids)
    stored = read_store(tmp_path / "s")
    assert set(stored) == set(corpus.clean)
    assert_matches_clean(corpus, stored)


class ReplicaOneOOM(Faults):
    """The first ``k`` launches of replica 1 holding at least two items run out of memory."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def before_launch(self, runner, staged):
        with self.lock:
            hit = runner.index == 1 and self.ooms < self.k and len(staged.items) >= 2
            if hit:
                self.ooms += 1
        if hit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated, replica 1)")


def test_an_oom_in_one_replica_is_recovered_and_lowers_only_its_budget(corpus, tmp_path):
    faults = ReplicaOneOOM(k=3)
    make = factory(corpus, faults)
    summary = run_embed(corpus.config(tmp_path / "s", replicas_per_gpu=2, threads=2),
                        runner_factory=make)
    assert len(make.made) == 2 and faults.ooms == 3
    first, second = summary.devices
    assert (first["device"], second["device"]) == ("cpu#0", "cpu#1")
    assert (first["oom_events"], second["oom_events"]) == (0, 3)
    assert first["budget_tokens"] == 512 > second["budget_tokens"]  # the other kept its budget
    assert_counts(corpus, summary)
    stored = read_store(tmp_path / "s")
    assert set(stored) == set(corpus.clean)
    assert_matches_clean(corpus, stored)
    finished = [d for batch in faults.finished_batches for d in batch]
    assert sorted(finished) == sorted(corpus.digest_ids)  # each sequence finished once
    assert all(d["batches"] > 0 for d in summary.devices)
