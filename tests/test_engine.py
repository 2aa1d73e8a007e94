"""What ``gpuengine embed`` stores, end to end on the CPU: the Python reading API, truncation,
deduplication and reruns, several layers and poolings, store dtype, batch-size independence
and map growth; and the run's collector settings. Values are compared with fair-esm's own
forward (max |diff| <= 1e-5, fp32). Faults injected into the engine: test_engine_faults.py."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest

from cli_runs import (DIM, IDS, LAST, SEQS, cli, embed, fails, info_outputs, snapshot,
                      standard_fasta)
from conftest import (assert_close, fair_esm_reference, isolated_cache, max_diff,
                      random_proteins, write_fasta)
from digest_runner import DigestRunner
from gpuengine.engine import relaxed_collector

POOLS = ("mean", "bos", "per-token")


@pytest.fixture
def store(standard_store):
    """The standard input embedded once with default options (read-only for the tests)."""
    return standard_store["path"]


# ----------------------------------------------------------------------------- Python API


def test_python_api_reads_what_fair_esm_computes(store, reference):
    from gpuengine import EmbeddingStore

    with EmbeddingStore(store) as emb:
        assert len(emb) == len(IDS)
        assert sorted(emb) == sorted(IDS)  # iteration yields every id once
        assert sorted(emb.ids()) == sorted(IDS)
        for i, rid in enumerate(IDS):
            vector = emb[rid]
            assert vector.shape == (DIM,) and vector.dtype == np.float32
            assert_close(vector, reference[LAST]["mean"][i], rid)
            assert rid in emb
            np.testing.assert_array_equal(emb.get(rid), vector)
        items = dict(emb.items())
        assert sorted(items) == sorted(IDS)
        for rid, vector in items.items():
            np.testing.assert_array_equal(vector, emb[rid])
        order = [IDS[4], IDS[0], IDS[2]]
        matrix = emb.get_many(order)
        assert matrix.shape == (3, DIM)
        assert_close(matrix, reference[LAST]["mean"][[4, 0, 2]], "get_many in order")
        assert emb.spec.model.name == "esm2_t2_tiny" and "esm2_t2_tiny" in emb.spec.describe()
        assert emb.output.layer == LAST and emb.output.pool == "mean"


def test_python_api_missing_ids(store):
    from gpuengine import EmbeddingStore

    with EmbeddingStore(store) as emb:
        with pytest.raises(KeyError, match="no-such-id"):
            emb["no-such-id"]
        assert emb.get("no-such-id") is None and "no-such-id" not in emb
        with pytest.raises(KeyError, match="absent"):
            emb.get_many(["P1", "absent", "P4"])
        skipped = emb.get_many(["P1", "absent", "P4"], missing="skip")
        np.testing.assert_array_equal(skipped, emb.get_many(["P1", "P4"]))
        with pytest.raises(TypeError):
            emb.get_many("P1")
        assert emb.get_many([]).shape == (0, DIM)


def test_python_api_returns_copies(store):
    from gpuengine import EmbeddingStore

    with EmbeddingStore(store) as emb:
        vector = emb["P1"]
        vector[:] = 0
        assert np.abs(emb["P1"]).max() > 0


def test_cpu_batches_default_to_the_cpu_token_cap(tiny_pt, tmp_path):
    """Without --max-tokens a CPU device packs at most DEFAULT_CPU_MAX_TOKENS per batch (the
    GPU cap is far larger: handing it to the CPU made one huge batch)."""
    from gpuengine.budget import DEFAULT_CPU_MAX_TOKENS
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed

    seqs = random_proteins([98] * 120, seed=11)  # 100 tokens each, 12 000 in all
    fasta = write_fasta(tmp_path / "p.fa", [(f"s{i}", s) for i, s in enumerate(seqs)])
    summary = run_embed(EmbedConfig(inputs=(fasta,), model=str(tiny_pt), out=tmp_path / "s.lmdb",
                                    devices="cpu"))
    assert summary.exit_code == 0 and summary.embedded == len(set(seqs))
    (device,) = summary.devices
    assert device["batches"] >= -(-device["tokens"] // DEFAULT_CPU_MAX_TOKENS) >= 3, device


def test_run_embed_library_call(tiny_pt, tmp_path, reference):
    """The engine as a library: EmbedConfig in, RunSummary out."""
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed
    from gpuengine.store.reader import EmbeddingStore

    fasta = standard_fasta(tmp_path / "p.fa")
    config = EmbedConfig(inputs=(fasta,), model=str(tiny_pt), out=tmp_path / "s.lmdb",
                         layers=(1, -1), pools=("mean", "bos"), max_tokens=128, commit_every=2)
    summary = run_embed(config)
    assert summary.exit_code == 0 and summary.embedded == len(IDS)
    assert summary.committed_records == len(IDS) and not summary.failed
    for layer in (1, LAST):
        for pool in ("mean", "bos"):
            with EmbeddingStore(tmp_path / "s.lmdb", layer=layer, pool=pool) as emb:
                assert_close(emb.get_many(IDS), reference[layer][pool], f"layer{layer}/{pool}")


# ----------------------------------------------------------------------------- truncation


@pytest.fixture(scope="module")
def long_proteins():
    return random_proteins([1100, 30], seed=21)


def test_default_truncates_to_1022_like_fair_esm(tiny_pt, tmp_path, long_proteins):
    from gpuengine import EmbeddingStore

    fasta = write_fasta(tmp_path / "long.fa", [("long", long_proteins[0]),
                                               ("short", long_proteins[1])])
    summary = embed(fasta, tiny_pt, tmp_path / "s.lmdb", "--pool", "mean,per-token")
    assert summary["truncated"] == 1 and summary["embedded"] == 2
    assert summary["residues"] == 1022 + 30
    ref = fair_esm_reference(tiny_pt, long_proteins, [LAST], truncation=1022)[LAST]
    full = fair_esm_reference(tiny_pt, long_proteins[:1], [LAST], truncation=10**6)[LAST]
    with EmbeddingStore(tmp_path / "s.lmdb", pool="mean") as emb:
        assert_close(emb.get_many(["long", "short"]), ref["mean"], "truncated mean")
        assert max_diff(emb["long"], full["mean"][0]) > 1e-4  # truncation did change it
    with EmbeddingStore(tmp_path / "s.lmdb", pool="per-token") as emb:
        tokens = emb["long"]
        assert tokens.shape == (1022, DIM)
        assert_close(tokens, ref["per-token"][0], "truncated per-token")


def test_max_residues_0_never_truncates(tiny_pt, tmp_path, long_proteins):
    from gpuengine import EmbeddingStore

    fasta = write_fasta(tmp_path / "long.fa", [("long", long_proteins[0]),
                                               ("short", long_proteins[1])])
    summary = embed(fasta, tiny_pt, tmp_path / "s.lmdb", "--max-residues", "0")
    assert summary["truncated"] == 0 and summary["residues"] == 1100 + 30
    full = fair_esm_reference(tiny_pt, long_proteins, [LAST], truncation=10**6)[LAST]
    with EmbeddingStore(tmp_path / "s.lmdb") as emb:
        assert emb.spec.max_residues is None
        assert_close(emb.get_many(["long", "short"]), full["mean"], "untruncated mean")


def test_other_max_residues_needs_another_table(tiny_pt, tmp_path, long_proteins):
    from gpuengine import EmbeddingStore

    fasta = write_fasta(tmp_path / "long.fa", [("long", long_proteins[0])])
    out = tmp_path / "s.lmdb"
    embed(fasta, tiny_pt, out)
    before = snapshot(out)
    for value, shown in (("500", "500"), ("0", "none")):
        err = fails(fasta, tiny_pt, out, "--max-residues", value)
        assert "max_residues" in err and shown in err and "--table" in err, err
    assert snapshot(out) == before
    summary = embed(fasta, tiny_pt, out, "--max-residues", "500", "--table", "r500")
    assert summary["truncated"] == 1
    ref = fair_esm_reference(tiny_pt, long_proteins[:1], [LAST], truncation=500)[LAST]
    with EmbeddingStore(out, table="r500") as emb:
        assert_close(emb["long"], ref["mean"][0], "--max-residues 500")


def test_truncated_ids_conflict_only_on_the_embedded_part(tiny_pt, tmp_path, long_proteins):
    """Two runs giving one id sequences that differ only after residue 1022 agree."""
    out = tmp_path / "s.lmdb"
    embed(write_fasta(tmp_path / "a.fa", [("long", long_proteins[0])]), tiny_pt, out)
    changed = long_proteins[0][:1050] + "K" * 50
    summary = embed(write_fasta(tmp_path / "b.fa", [("long", changed)]), tiny_pt, out)
    assert summary["already_stored"] == 1 and summary["embedded"] == 0


# ----------------------------------------------------------------------------- dedup, reruns


def test_identical_sequences_are_embedded_once_and_reruns_do_nothing(tiny_pt, tmp_path,
                                                                     reference):
    from gpuengine import EmbeddingStore

    fasta = write_fasta(tmp_path / "a.fa", [("A", SEQS[2]), ("B", SEQS[2]), ("C", SEQS[4])])
    out = tmp_path / "s.lmdb"
    first = embed(fasta, tiny_pt, out)
    assert first["embedded"] == 2 and first["deduplicated"] == 1
    assert first["committed_records"] == 3 and first["valid_records"] == 3
    assert first["tokens"] == len(SEQS[2]) + len(SEQS[4]) + 4
    with EmbeddingStore(out) as emb:
        assert len(emb) == 3
        np.testing.assert_array_equal(emb["A"], emb["B"])
        assert_close(emb["A"], reference[LAST]["mean"][2], "A")
        assert_close(emb["C"], reference[LAST]["mean"][4], "C")
        assert emb.info()["tables"]["default"]["embeddings"] == 2

    again = embed(fasta, tiny_pt, out)
    assert again["already_stored"] == 3
    assert again["embedded"] == again["committed_records"] == again["tokens"] == 0

    more = write_fasta(tmp_path / "b.fa", [("D", SEQS[2]), ("E", SEQS[5])])
    third = embed([fasta, more], tiny_pt, out)
    assert third["already_stored"] == 3 and third["embedded"] == 1
    assert third["deduplicated"] == 1 and third["committed_records"] == 2
    with EmbeddingStore(out) as emb:
        assert len(emb) == 5
        np.testing.assert_array_equal(emb["D"], emb["A"])
        assert_close(emb["E"], reference[LAST]["mean"][5], "E")


def test_many_repeats_in_small_batches(tiny_pt, tmp_path):
    """200 ids over 20 sequences in batches of ~64 tokens: each sequence computed once, every
    id committed once (aliases of sequences pending, committing and already stored)."""
    from gpuengine import EmbeddingStore
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed

    distinct = random_proteins([10 + 3 * i for i in range(20)], seed=5)
    records = [(f"id{i}", distinct[(i * 7) % 20]) for i in range(200)]
    fasta = write_fasta(tmp_path / "rep.fa", records)
    config = EmbedConfig(inputs=(fasta,), model=str(tiny_pt), out=tmp_path / "s.lmdb",
                         max_tokens=64, commit_every=1)
    summary = run_embed(config)
    assert summary.embedded == 20 and summary.deduplicated == 180
    assert summary.committed_records == 200
    ref = fair_esm_reference(tiny_pt, distinct, [LAST])[LAST]["mean"]
    with EmbeddingStore(tmp_path / "s.lmdb") as emb:
        assert len(emb) == 200
        got = emb.get_many([rid for rid, _ in records])
    want = np.stack([ref[(i * 7) % 20] for i in range(200)])
    assert_close(got, want, "repeated sequences")


# ----------------------------------------------------------------------------- layers, pools


@pytest.fixture(scope="module")
def multi(tiny_pt, tmp_path_factory):
    base = tmp_path_factory.mktemp("multi")
    with isolated_cache(base / "cache"):
        summary = embed(standard_fasta(base / "p.fa"), tiny_pt, base / "s.lmdb",
                        "--layers", "0,1,-1", "--pool", "mean,bos,per-token",
                        "--max-tokens", "200")
    assert summary["embedded"] == len(IDS)
    return base / "s.lmdb"


@pytest.mark.parametrize("layer", [0, 1, LAST])
@pytest.mark.parametrize("pool", POOLS)
def test_every_layer_and_pool_equals_fair_esm(multi, reference, layer, pool):
    from gpuengine import EmbeddingStore

    with EmbeddingStore(multi, layer=layer, pool=pool) as emb:
        assert emb.output.layer == layer and emb.output.pool == pool
        if pool == "per-token":
            arrays = emb.get_many(IDS)
            for i, (rid, array) in enumerate(zip(IDS, arrays)):
                assert array.shape == (len(SEQS[i]), DIM)
                assert_close(array, reference[layer]["per-token"][i], f"{rid} layer{layer}")
                np.testing.assert_array_equal(emb[rid], array)
        else:
            assert_close(emb.get_many(IDS), reference[layer][pool], f"layer{layer}/{pool}")


def test_multi_output_table_spec_and_negative_layer(multi, reference):
    from gpuengine import EmbeddingStore

    with EmbeddingStore(multi, layer=-1, pool="bos") as emb:
        assert emb.output.layer == LAST
        assert_close(emb.get_many(IDS), reference[LAST]["bos"], "layer -1 bos")
        labels = sorted((o.layer, o.pool) for o in emb.spec.outputs)
        assert labels == sorted((layer, pool) for layer in (0, 1, LAST) for pool in POOLS)
    with pytest.raises(ValueError, match="several outputs"):
        EmbeddingStore(multi, pool="mean")
    result = cli("lookup", multi, "P1", "--pool", "mean")
    assert result.exit_code == 2 and "several outputs" in result.stderr
    result = cli("info", multi)
    assert result.exit_code == 0
    items = info_outputs(result.stdout)
    assert len(items) == 9 and all(len(item) == 2 for item in items)


def test_lookup_per_token_prints_one_row_per_residue(multi, reference):
    result = cli("lookup", multi, "P4", "--layer", "0", "--pool", "per-token")
    assert result.exit_code == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(rows) == len(SEQS[3]) and {r[0] for r in rows} == {"P4"}
    got = np.array([[float(x) for x in r[1:]] for r in rows])
    assert_close(got, reference[0]["per-token"][3], "lookup per-token")
    result = cli("lookup", multi, "P4", "--layer", "0", "--pool", "per-token", "--json")
    row = json.loads(result.stdout)
    assert row["shape"] == [len(SEQS[3]), DIM] and row["pool"] == "per-token"


def test_export_per_token_npz_with_offsets(multi, tmp_path):
    from gpuengine import EmbeddingStore

    out = tmp_path / "tokens.npz"
    result = cli("export", multi, "-o", out, "--layer", "1", "--pool", "per-token")
    assert result.exit_code == 0, result.stderr
    with np.load(out, allow_pickle=False) as data:
        ids, matrix, offsets = data["ids"].tolist(), data["embeddings"], data["offsets"]
        assert int(data["layer"]) == 1 and str(data["pool"]) == "per-token"
    assert sorted(ids) == sorted(IDS) and offsets[0] == 0 and offsets[-1] == len(matrix)
    assert matrix.shape == (sum(len(s) for s in SEQS), DIM)
    with EmbeddingStore(multi, layer=1, pool="per-token") as emb:
        for k, rid in enumerate(ids):
            np.testing.assert_array_equal(matrix[offsets[k]:offsets[k + 1]], emb[rid])
    result = cli("export", multi, "-o", tmp_path / "t.tsv", "-f", "tsv", "--layer", "1",
                 "--pool", "per-token")
    assert result.exit_code == 0, result.stderr
    rows = (tmp_path / "t.tsv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == len(matrix)
    for k, rid in enumerate(ids):
        block = [r.split("\t") for r in rows[offsets[k]:offsets[k + 1]]]
        assert {r[0] for r in block} == {rid}
        np.testing.assert_array_equal(np.array([r[1:] for r in block], dtype=np.float32),
                                      matrix[offsets[k]:offsets[k + 1]])


def test_store_dtype_float16(tiny_pt, tmp_path, reference, store):
    from gpuengine import EmbeddingStore

    embed(standard_fasta(tmp_path / "p.fa"), tiny_pt, tmp_path / "s.lmdb",
          "--store-dtype", "float16", "--pool", "mean,per-token")
    with EmbeddingStore(tmp_path / "s.lmdb", pool="mean") as emb, EmbeddingStore(store) as fp32:
        got = emb.get_many(IDS)
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), reference[LAST]["mean"],
                                   rtol=1e-3, atol=1e-3)
        # the fp32 vectors rounded to nearest
        np.testing.assert_array_equal(got, fp32.get_many(IDS).astype(np.float16))
    with EmbeddingStore(tmp_path / "s.lmdb", pool="per-token") as emb:
        assert emb["P6"].dtype == np.float16 and emb["P6"].shape == (len(SEQS[5]), DIM)
    result = cli("lookup", tmp_path / "s.lmdb", "P6", "--pool", "mean")
    with EmbeddingStore(tmp_path / "s.lmdb", pool="mean") as emb:
        np.testing.assert_array_equal(
            np.array(result.stdout.split("\t")[1:], dtype=np.float16), emb["P6"])


def test_batch_size_does_not_change_stored_values(tiny_pt, tmp_path):
    from gpuengine import EmbeddingStore

    seqs = random_proteins([3, 9, 30, 31, 50, 77, 120, 200, 8, 16, 64, 1], seed=33)
    ids = [f"s{i}" for i in range(len(seqs))]
    fasta = write_fasta(tmp_path / "p.fa", list(zip(ids, seqs)))
    embed(fasta, tiny_pt, tmp_path / "small.lmdb", "--max-tokens", "16")
    embed(fasta, tiny_pt, tmp_path / "big.lmdb", "--max-tokens", "4096")
    with EmbeddingStore(tmp_path / "small.lmdb") as a, EmbeddingStore(tmp_path / "big.lmdb") as b:
        assert_close(a.get_many(ids), b.get_many(ids), "batches of 16 vs 4096 tokens", tol=1e-6)


# ----------------------------------------------------------------------------- map growth


@pytest.mark.slow
def test_map_grows_through_the_engine(tiny_pt, tmp_path, monkeypatch):
    """The engine does not expose StoreWriter's initial_map_size (EmbedConfig has no field for
    it), so the writer it creates is replaced by one starting from a 64 KiB map."""
    import gpuengine.run_store as run_store
    from gpuengine import EmbeddingStore
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed
    from gpuengine.store.writer import StoreWriter

    writers = []

    class SmallMapWriter(StoreWriter):
        def __init__(self, path, **kwargs):
            kwargs.setdefault("initial_map_size", 1 << 16)
            super().__init__(path, **kwargs)
            writers.append(self)

    monkeypatch.setattr(run_store, "StoreWriter", SmallMapWriter)
    seqs = random_proteins([40 + (i % 60) for i in range(60)], seed=8)
    ids = [f"m{i}" for i in range(len(seqs))]
    fasta = write_fasta(tmp_path / "p.fa", list(zip(ids, seqs)))
    out = tmp_path / "s.lmdb"
    config = EmbedConfig(inputs=(fasta,), model=str(tiny_pt), out=out, pools=("mean", "per-token"),
                         max_tokens=512, commit_every=10)  # 6 transactions or more
    summary = run_embed(config)
    assert summary.embedded == len(seqs) and summary.exit_code == 0
    assert len(writers) == 1 and writers[0].map_growths >= 2
    ref = fair_esm_reference(tiny_pt, seqs, [LAST])[LAST]
    with EmbeddingStore(out, pool="per-token") as emb:
        info = emb.info()
        assert info["map_size"] > 1 << 20 and info["file_size"] <= info["map_size"]
        assert len(emb) == len(seqs)
        for i in (0, 30, 59):
            assert_close(emb[ids[i]], ref["per-token"][i], ids[i])
    with EmbeddingStore(out, pool="mean") as emb:
        assert_close(emb.get_many(ids), ref["mean"], "means after map growth")


def test_embed_config_refuses_a_bad_table_name(tmp_path):
    from gpuengine.config import EmbedConfig
    from gpuengine.errors import UsageError

    with pytest.raises(UsageError, match="table"):
        EmbedConfig(inputs=(tmp_path / "p.fa",), model="m.pt", out=tmp_path / "s", table="a b")


def test_completion_records_commit_with_the_last_embeddings(tiny_pt, tmp_path):
    """A caller's run records (the daemon's job record) are written in the transaction of the
    run's last group, with the summary that group completes; an interrupted run writes none."""
    import threading

    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed
    from gpuengine.store.writer import StoreWriter

    fasta = write_fasta(tmp_path / "in.fa", list(zip(IDS, SEQS)))
    seen = []

    def job(summary):
        seen.append((summary.committed_records, summary.embedded))
        return {"job-1": {"run_id": "job-1", "status": "complete",
                          "counts": {"committed_records": summary.committed_records}}}

    config = EmbedConfig(inputs=(fasta,), model=str(tiny_pt), out=tmp_path / "s.lmdb",
                         devices="cpu")
    summary = run_embed(config, completion_records=job)
    assert seen == [(summary.committed_records, summary.embedded)] and summary.committed_records
    with StoreWriter(tmp_path / "s.lmdb") as writer:
        assert writer.run_record("job-1")["counts"]["committed_records"] == summary.committed_records
    stop = threading.Event()
    stop.set()
    interrupted = run_embed(EmbedConfig(inputs=(fasta,), model=str(tiny_pt),
                                        out=tmp_path / "t.lmdb", devices="cpu"),
                            stop=stop, completion_records=job)
    assert len(seen) == 1 and (interrupted.interrupted or interrupted.committed_records == 0)


# ----------------------------------------------------------------------------- exactly once


def _slow_records(records, every=25, stop=None, stop_after=None):
    """A RecordSource that pauses now and then, so that earlier groups become durable before
    their sequences come again (and that can request a stop part way)."""
    import time

    from gpuengine.inputs import RecordSource
    from gpuengine.records import FastaRecord

    def iterate():
        for i, (rid, seq) in enumerate(records):
            if i and i % every == 0:
                time.sleep(0.05)
            if stop is not None and i == stop_after:
                stop.set()
            yield FastaRecord(rid, seq, "mem", i + 1, i)

    return RecordSource(iterate, len(records), sum(len(s) for _, s in records))


def test_every_sequence_committed_once_fresh_resumed_and_rerun(tiny_pt, tmp_path, monkeypatch):
    """Repeats that come after their sequence is durable (the first run, on a fresh table,
    looks none of its unseen digests up), an interrupted run resumed, and a rerun with new
    ids of stored sequences: each sequence is computed and committed once, each id once."""
    import threading

    from gpuengine import EmbeddingStore, inputs
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed
    from gpuengine.store import codec
    from gpuengine.store.lookup import TableLookup

    monkeypatch.setattr(inputs, "LOOKUP_CHUNK", 10)
    found = []
    real_has = TableLookup.has_embeddings

    def has_embeddings(self, digests):
        answer = real_has(self, digests)
        found.extend(d for d, present in zip(digests, answer) if present)
        return answer

    monkeypatch.setattr(TableLookup, "has_embeddings", has_embeddings)
    distinct = random_proteins([8 + i for i in range(30)], seed=11)
    first = [(f"a{i}", distinct[(i * 7) % 20]) for i in range(300)]  # 20 sequences
    computed: list[bytes] = []
    out = tmp_path / "s.lmdb"

    def run(records, stop=None):
        fasta = tmp_path / f"{records.count}.fa"  # names the run (its id) only
        if not fasta.exists():
            fasta.write_text("")
        config = EmbedConfig(inputs=(fasta,), model=str(tiny_pt), out=out,
                             max_tokens=64, commit_every=4)
        return run_embed(config, stop=stop, records=records,
                         runner_factory=lambda d, p, o: DigestRunner(o, computed))

    summary = run(_slow_records(first))
    assert summary.embedded == 20 and summary.committed_records == 300
    assert sorted(computed) == sorted({codec.sequence_digest(s) for _, s in first})
    assert found, "no repeat came after its sequence was durable: the test lost its point"

    # an interrupted run over 10 new sequences (and new ids of old ones), then its resume
    second = [(f"b{i}", distinct[i % 30]) for i in range(200)]
    computed.clear()
    stop = threading.Event()
    partial = run(_slow_records(second, stop=stop, stop_after=60), stop=stop)
    assert partial.interrupted
    resumed = run(_slow_records(second))
    assert resumed.run_started["resumes"] == 1
    assert partial.embedded + resumed.embedded == 10
    assert partial.committed_records + resumed.committed_records == 200
    assert resumed.already_stored == partial.committed_records
    assert len(computed) == len(set(computed))  # nothing computed twice (none was in flight)
    with EmbeddingStore(out) as emb:
        assert len(emb) == 500
        assert emb.info()["tables"]["default"]["embeddings"] == 30
        for rid, seq in first + second:
            want = np.frombuffer(codec.sequence_digest(seq) * 4, np.uint8).astype(np.float32)
            np.testing.assert_array_equal(emb[rid], want)


# ----------------------------------------------------------------------------- collector
# The garbage-collector settings of a run are restored afterwards, also when runs overlap or
# fail.


def test_thresholds_and_freeze_are_restored():
    before = gc.get_threshold()
    with relaxed_collector(12_345):
        assert gc.get_threshold()[0] == 12_345
        assert gc.get_threshold()[1:] == before[1:]
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_overlapping_runs_restore_only_when_the_last_leaves():
    before = gc.get_threshold()
    outer = relaxed_collector(20_000)
    outer.__enter__()
    with relaxed_collector(30_000):  # a second run started meanwhile keeps the first's setting
        assert gc.get_threshold()[0] == 20_000
    assert gc.get_threshold()[0] == 20_000  # the first run is still going
    outer.__exit__(None, None, None)
    assert gc.get_threshold() == before


def test_restored_after_an_error():
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), relaxed_collector():
        raise RuntimeError("boom")
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
