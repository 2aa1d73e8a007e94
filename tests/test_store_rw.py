"""Writer and reader in one process: round trips, aliasing, refusals, map growth, runs."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import lmdb
import numpy as np
import pytest

from gpuengine.errors import InternalError, StoreError, StoreMismatchError
from gpuengine.store import (
    CommitEntry,
    EmbeddingStore,
    ModelIdentity,
    OutputSpec,
    StoreWriter,
    TableSpec,
    sequence_digest,
)

MEAN = OutputSpec(6, "mean")
BOS = OutputSpec(6, "bos")
TOKENS = OutputSpec(6, "per-token")


def make_spec(name: str = "default", outputs: tuple[OutputSpec, ...] = (MEAN,),
              store_dtype: str = "float16", sha256: str = "ab" * 32, dim: int = 8) -> TableSpec:
    model = ModelIdentity(family="esm2", name="esm2_t6_8M_UR50D", sha256=sha256,
                          num_layers=6, embed_dim=dim, attention_heads=4, vocab_size=33)
    return TableSpec(name=name, model=model, outputs=outputs, store_dtype=store_dtype, dim=dim,
                     max_residues=1022)


def entry(seq: str, ids: tuple[str, ...], spec: TableSpec | None, seed: int = 0,
          residues: int = 4) -> CommitEntry:
    """An entry with deterministic vectors for every output of ``spec`` (None: alias)."""
    if spec is None:
        return CommitEntry(sequence_digest(seq), ids, None)
    rng = np.random.default_rng(seed)
    vectors = {o: rng.standard_normal((residues, spec.dim) if o.per_token else spec.dim)
               for o in spec.outputs}
    return CommitEntry(sequence_digest(seq), ids, vectors)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "x.lmdb"


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_pooled_and_per_token(store_path: Path, dtype: str) -> None:
    spec = make_spec(outputs=(MEAN, TOKENS, BOS), store_dtype=dtype)
    entries = [entry(f"SEQ{i}", (f"id{i}",), spec, seed=i, residues=i + 1) for i in range(5)]
    with StoreWriter(store_path) as writer:
        writer.open_table(spec)
        writer.commit("default", entries)
    for output in spec.outputs:
        with EmbeddingStore(store_path, layer=6, pool=output.pool) as store:
            assert store.output == output and len(store) == 5
            for i, e in enumerate(entries):
                got = store[f"id{i}"]
                assert got.dtype == np.dtype(dtype)
                np.testing.assert_array_equal(got, e.vectors[output].astype(dtype))
            many = store.get_many([f"id{i}" for i in range(5)])
            if output.per_token:
                assert [m.shape for m in many] == [(i + 1, 8) for i in range(5)]
            else:
                assert many.shape == (5, 8) and many.dtype == np.dtype(dtype)
                np.testing.assert_array_equal(many[3], entries[3].vectors[output].astype(dtype))
    with EmbeddingStore(store_path) as store:
        assert store.output == MEAN  # the first output is the default


def test_long_and_unicode_ids(store_path: Path) -> None:
    spec = make_spec()
    ids = ["P1", "α-β/γ", "名前🧬", "a" * 511, "a" * 512, "é" * 300, "🧬" * 200, "z" * 5000]
    with StoreWriter(store_path) as writer:
        writer.open_table(spec)
        writer.commit("default",
                      [entry(f"S{i}", (rid,), spec, seed=i) for i, rid in enumerate(ids)])
        assert all(d is not None for d in writer.lookup("default").record_digests(ids))
    with EmbeddingStore(store_path) as store:
        assert sorted(store) == sorted(ids) and len(store) == len(ids)
        assert sorted(store.ids()) == sorted(ids)
        assert {rid for rid, _ in store.items()} == set(ids)
        for rid in ids:
            assert rid in store and store[rid].shape == (8,)
        assert "a" * 513 not in store and "" not in store


def test_iteration_crosses_chunks(store_path: Path) -> None:
    spec = make_spec()
    with StoreWriter(store_path) as writer:
        writer.open_table(spec)
        writer.commit("default",
                      [entry(f"S{i}", (f"r{i:05d}",), spec, seed=i) for i in range(2500)])
    with EmbeddingStore(store_path) as store:
        assert list(store) == [f"r{i:05d}" for i in range(2500)]
        assert sum(1 for _ in store.items()) == 2500


def test_aliasing_two_ids_one_embedding(store_path: Path) -> None:
    spec = make_spec()
    with StoreWriter(store_path) as writer:
        writer.open_table(spec)
        writer.commit("default", [entry("MKV", ("a", "b"), spec)])
        writer.commit("default", [entry("MKV", ("c",), None)])
        assert writer.lookup("default").has_embeddings(
            [sequence_digest("MKV"), sequence_digest("X")]) == [True, False]
    with EmbeddingStore(store_path) as store:
        np.testing.assert_array_equal(store["a"], store["c"])
        np.testing.assert_array_equal(store["a"], store["b"])
        assert store.info()["tables"]["default"] == {
            "spec": spec.to_json(), "records": 3, "embeddings": 1}


def test_alias_without_embedding_is_internal_error(store_path: Path) -> None:
    spec = make_spec()
    with StoreWriter(store_path) as writer:
        writer.open_table(spec)
        with pytest.raises(InternalError, match="alias-only"):
            writer.commit("default", [entry("A", ("a",), spec), entry("NOPE", ("b",), None)])
        assert writer.lookup("default").record_digests(["a", "b"]) == [None, None]


def test_remapped_id_is_refused_and_txn_discarded(store_path: Path) -> None:
    spec = make_spec()
    with StoreWriter(store_path) as writer:
        writer.open_table(spec)
        writer.begin_run("r1", {})
        writer.commit("default", [entry("SEQ1", ("p1",), spec)], run_id="r1")
        with pytest.raises(StoreMismatchError, match="'p1'"):
            writer.commit("default", [entry("NEW", ("fresh",), spec),
                                      entry("SEQ2", ("p1",), spec)], run_id="r1")
        run = writer.run_record("r1")
        assert (run["committed_sequences"], run["committed_records"]) == (1, 1)
        assert writer.lookup("default").has_embeddings([sequence_digest("NEW")]) == [False]
    with EmbeddingStore(store_path) as store:
        assert list(store) == ["p1"] and "fresh" not in store
        assert store.info()["tables"]["default"]["embeddings"] == 1


def test_commit_validates_vectors(store_path: Path) -> None:
    spec = make_spec(outputs=(MEAN, TOKENS))
    with StoreWriter(store_path) as writer:
        writer.open_table(spec)
        with pytest.raises(InternalError, match="vectors for"):
            writer.commit("default", [CommitEntry(sequence_digest("A"), ("a",),
                                                  {MEAN: np.zeros(8)})])
        with pytest.raises(InternalError, match="shape"):
            writer.commit("default", [CommitEntry(sequence_digest("A"), ("a",),
                                                  {MEAN: np.zeros(8), TOKENS: np.zeros(8)})])
        with pytest.raises(InternalError, match="open_table"):
            writer.commit("other", [])


def test_table_mismatch_refused_and_named_table_accepted(store_path: Path) -> None:
    with StoreWriter(store_path) as writer:
        writer.open_table(make_spec())
        writer.commit("default", [entry("A", ("a",), make_spec())])
    with StoreWriter(store_path) as writer:
        writer.open_table(make_spec())  # same spec: fine
        with pytest.raises(StoreMismatchError) as info:
            writer.open_table(make_spec(outputs=(OutputSpec(3, "mean"),), sha256="cd" * 32))
        message = str(info.value)
        assert "table 'default' holds" in message and "--table NAME" in message
        assert "outputs differ (store: layer6/mean, run: layer3/mean)" in message
        assert "model weights sha256 differ" in message
        other = make_spec(name="other", outputs=(OutputSpec(3, "mean"),), store_dtype="float32")
        writer.open_table(other)
        writer.commit("other", [entry("A", ("a",), other)])
    with EmbeddingStore(store_path) as store:
        assert store.tables == ("default", "other") and store.spec.name == "default"
    with EmbeddingStore(store_path, table="other") as store:
        assert store.output == OutputSpec(3, "mean") and store["a"].dtype == np.float32
    with pytest.raises(KeyError, match="default, other"):
        EmbeddingStore(store_path, table="missing")


def test_output_selection(store_path: Path) -> None:
    spec = make_spec(outputs=(MEAN, BOS, OutputSpec(3, "mean")))
    with StoreWriter(store_path) as writer:
        writer.open_table(spec)
    with EmbeddingStore(store_path, pool="bos") as store:
        assert store.output == BOS
    with EmbeddingStore(store_path, layer=3) as store:
        assert store.output == OutputSpec(3, "mean")
    with EmbeddingStore(store_path, layer=-1, pool="mean") as store:
        assert store.output == MEAN
    with pytest.raises(ValueError, match="layer6/mean, layer6/bos"):
        EmbeddingStore(store_path, layer=6)
    with pytest.raises(KeyError, match="choices"):
        EmbeddingStore(store_path, pool="per-token")


def test_get_many_missing_modes(store_path: Path) -> None:
    spec = make_spec()
    with StoreWriter(store_path) as writer:
        writer.open_table(spec)
        writer.commit("default", [entry("A", ("a",), spec, 1), entry("B", ("b",), spec, 2)])
    with EmbeddingStore(store_path) as store:
        with pytest.raises(KeyError, match="'zz'"):
            store.get_many(["a", "zz", "b"])
        got = store.get_many(["b", "zz", "a"], missing="skip")
        np.testing.assert_array_equal(got, np.stack([store["b"], store["a"]]))
        assert store.get_many([]).shape == (0, 8)
        assert store.get("zz", 5) == 5
        with pytest.raises(KeyError, match="'zz'"):
            store["zz"]


def test_map_growth_from_64k(store_path: Path) -> None:
    spec = make_spec(outputs=(MEAN, TOKENS), dim=64, store_dtype="float32")
    with StoreWriter(store_path, initial_map_size=64 << 10) as writer:
        assert writer.map_size == 64 << 10
        writer.open_table(spec)
        for g in range(20):  # ~20 x 250 KB
            writer.commit("default", [entry(f"S{g}-{j}", (f"g{g}-{j}",), spec, seed=g * 10 + j,
                                            residues=200) for j in range(5)])
        assert writer.map_growths > 0 and writer.map_size > 4 << 20
    with EmbeddingStore(store_path, pool="per-token") as store:
        assert len(store) == 100
        expected = entry("S7-3", ("x",), spec, seed=73, residues=200).vectors[TOKENS]
        np.testing.assert_array_equal(store["g7-3"], expected.astype(np.float32))


def test_reader_and_writer_share_env(store_path: Path) -> None:
    spec = make_spec()
    with StoreWriter(store_path) as writer:
        writer.open_table(spec)
        writer.commit("default", [entry("A", ("a",), spec)])
        with EmbeddingStore(store_path) as store:
            assert store._env.env is writer._env.env
            assert "a" in store
            writer.commit("default", [entry("B", ("b",), spec)])
            assert "b" in store  # every call is a fresh read transaction
        writer.commit("default", [entry("C", ("c",), spec)])  # reader close kept the env
    # a reader first, then a writer, in the same process
    with EmbeddingStore(store_path) as store, StoreWriter(store_path) as writer:
        writer.open_table(spec)
        writer.commit("default", [entry("D", ("d",), spec)])
        assert len(store) == 4
        with pytest.raises(StoreError, match="already open"):
            StoreWriter(store_path)


def test_queries_from_another_thread_during_growth(store_path: Path) -> None:
    spec = make_spec(dim=256, store_dtype="float32")
    stop = threading.Event()
    errors: list[BaseException] = []
    with StoreWriter(store_path, initial_map_size=64 << 10) as writer:
        writer.open_table(spec)
        lookup = writer.lookup("default")

        def poll() -> None:
            try:
                while not stop.is_set():
                    lookup.record_digests([f"g{g}" for g in range(50)])
                    lookup.has_embeddings([sequence_digest(f"S{g}") for g in range(50)])
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=poll)
        thread.start()
        for g in range(50):
            writer.commit("default", [entry(f"S{g}", (f"g{g}",), spec, seed=g)] +
                          [entry(f"S{g}-{j}", (f"g{g}-{j}",), spec, seed=j) for j in range(20)])
        stop.set()
        thread.join()
        assert not errors and writer.map_growths > 0
        assert all(lookup.has_embeddings([sequence_digest(f"S{g}") for g in range(50)]))


def test_run_records(store_path: Path) -> None:
    spec = make_spec()
    with StoreWriter(store_path) as writer:
        writer.open_table(spec)
        record = writer.begin_run("run-1", {"inputs": ["a.fasta"]})
        assert record["status"] == "running" and record["committed_sequences"] == 0
        writer.commit("default", [entry("A", ("a", "a2"), spec), entry("B", ("b",), spec)],
                      run_id="run-1")
        writer.commit("default", [entry("A", ("a3",), None)], run_id="run-1")
        writer.finish_run("run-1", "interrupted", {"failed": 0})
        resumed = writer.begin_run("run-1", {"inputs": ["a.fasta"]})
        assert (resumed["committed_sequences"], resumed["committed_records"]) == (2, 4)
        assert resumed["status"] == "running" and resumed["resumes"] == 1
        writer.finish_run("run-1", "complete", {"failed": 0})
        with pytest.raises(ValueError, match="complete"):
            writer.finish_run("run-1", "done", {})
        with pytest.raises(InternalError):
            writer.commit("default", [entry("C", ("c",), spec)], run_id="never-begun")
    with EmbeddingStore(store_path) as store:
        run = store.runs()["run-1"]
        assert run["status"] == "complete" and run["summary"] == {"failed": 0}
        assert len(store) == 4


def test_schema_newer_refused(store_path: Path) -> None:
    with StoreWriter(store_path) as writer:
        writer.open_table(make_spec())
    env = lmdb.open(str(store_path), max_dbs=64)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        record = json.loads(txn.get(b"store", db=meta))
        record["schema_version"] = 2
        txn.put(b"store", json.dumps(record).encode(), db=meta)
    env.close()
    with pytest.raises(StoreError, match="schema version 2"):
        EmbeddingStore(store_path)
    with pytest.raises(StoreError, match="schema version 2"):
        StoreWriter(store_path)


def test_non_store_refused(tmp_path: Path) -> None:
    missing = tmp_path / "missing.lmdb"
    with pytest.raises(StoreError, match="does not exist"):
        EmbeddingStore(missing)
    assert not missing.exists()
    (tmp_path / "file").write_text("x")
    for opener in (EmbeddingStore, StoreWriter):
        with pytest.raises(StoreError, match="not a gpuengine store"):
            opener(tmp_path / "file")
    other = tmp_path / "dir"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    for opener in (EmbeddingStore, StoreWriter):
        with pytest.raises(StoreError, match="not a gpuengine store"):
            opener(other)
    plain = tmp_path / "plain.lmdb"
    env = lmdb.open(str(plain), lib_version=0)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    env.close()
    for opener in (EmbeddingStore, StoreWriter):
        with pytest.raises(StoreError, match="not a gpuengine store"):
            opener(plain)
    empty = tmp_path / "empty"
    empty.mkdir()
    with StoreWriter(empty) as writer:  # an empty directory becomes a store
        writer.open_table(make_spec())
    with EmbeddingStore(empty) as store:
        assert len(store) == 0 and store.info()["lmdb_lib_version"].startswith("0.9")


def test_reader_on_read_only_store(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = make_spec()
    with StoreWriter(store_path) as writer:
        writer.open_table(spec)
        writer.commit("default", [entry("A", ("a",), spec)])
    from gpuengine.store import environment

    monkeypatch.setattr(environment.os, "access", lambda *args, **kwargs: False)
    with EmbeddingStore(store_path) as store:
        assert store._env.env.flags()["readonly"]
        assert list(store) == ["a"] and store["a"].shape == (8,)
        assert store.info()["tables"]["default"]["records"] == 1
        with pytest.raises(StoreError, match="read-only"):
            StoreWriter(store_path)


def test_docs_example_reads_a_store_without_gpuengine(tmp_path: Path) -> None:
    spec = make_spec(outputs=(MEAN, TOKENS), store_dtype="float32")
    long_id = "L" * 600
    with StoreWriter(tmp_path / "doc.lmdb") as writer:
        writer.open_table(spec)
        writer.commit("default", [entry("A", ("a", long_id), spec, seed=3, residues=5)])
    with EmbeddingStore(tmp_path / "doc.lmdb", pool="per-token") as store:
        expected_tokens = store["a"]
    with EmbeddingStore(tmp_path / "doc.lmdb") as store:
        expected = store["a"]
    text = (Path(__file__).resolve().parents[1] / "docs" / "store.md").read_text()
    marker = "executed by tests/test_store_rw.py -->\n```python\n"
    code = text[text.index(marker) + len(marker):]
    namespace: dict = {}
    exec(code[:code.index("```")], namespace)
    read = namespace["read_embedding"]
    path = str(tmp_path / "doc.lmdb")
    np.testing.assert_array_equal(read(path, "a"), expected)
    np.testing.assert_array_equal(read(path, long_id), expected)
    np.testing.assert_array_equal(read(path, "a", output=1), expected_tokens)
    assert read(path, "missing") is None


def test_package_exports_embedding_store() -> None:
    import gpuengine

    assert gpuengine.EmbeddingStore is EmbeddingStore


def _raw_contents(path: Path) -> dict[bytes, list[tuple[bytes, bytes]]]:
    """Every named database's (key, value) pairs, the run records aside."""
    env = lmdb.open(str(path), max_dbs=64, readonly=True, lock=False)
    out = {}
    with env.begin() as txn:
        names = [bytes(k) for k, _ in txn.cursor()]
        for name in names:
            if name.startswith((b"emb:", b"ids:")):
                out[name] = list(txn.cursor(db=env.open_db(name, txn=txn)))
    env.close()
    return out


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_commit_rows_store_what_entries_store(tmp_path: Path, dtype: str) -> None:
    """CommitRows (the engine's column-wise batches) write byte for byte what the same
    sequences as CommitEntry objects write, mixed with aliases, per-token outputs included."""
    from gpuengine.store.writer import CommitRows

    spec = make_spec(outputs=(MEAN, TOKENS, BOS), store_dtype=dtype)
    entries = [entry(f"SEQ{i}", (f"id{i}",) + ((f"twin{i}",) if i % 3 == 0 else ()), spec,
                     seed=i, residues=i + 1) for i in range(7)]
    alias = entry("SEQ2", ("alias2",), None)
    rows = CommitRows([e.seq_digest for e in entries], [e.record_ids for e in entries],
                      {o: [e.vectors[o] for e in entries] for o in spec.outputs})
    stacked = CommitRows(rows.seq_digests, rows.record_ids,
                         {o: (np.stack(v) if not o.per_token else v) for o, v in rows.vectors.items()})
    native = CommitRows(rows.seq_digests, rows.record_ids,  # already in the store dtype
                        {o: [v.astype(dtype) for v in vs] for o, vs in rows.vectors.items()})
    stores = {}
    for name, group in (("entries", [*entries, alias]), ("rows", [rows, alias]),
                        ("stacked", [stacked, alias]), ("native", [native, alias])):
        with StoreWriter(tmp_path / name) as writer:
            writer.open_table(spec)
            writer.commit("default", group)
        stores[name] = _raw_contents(tmp_path / name)
    assert stores["rows"] == stores["entries"] == stores["stacked"] == stores["native"]
    assert len(stores["rows"][b"ids:default"]) == 7 + 3 + 1


def test_commit_rows_refuse_bad_shapes_and_counts(store_path: Path) -> None:
    from gpuengine.store.writer import CommitRows

    spec = make_spec()
    digests = [sequence_digest("A"), sequence_digest("C")]
    with pytest.raises(InternalError, match="must all be as many"):
        CommitRows(digests, [("a",)], {MEAN: [np.zeros(8)] * 2})
    with pytest.raises(InternalError, match="names no record id"):
        CommitRows(digests, [("a",), ()], {MEAN: [np.zeros(8)] * 2})
    with StoreWriter(store_path) as writer:
        writer.open_table(spec)
        bad = CommitRows(digests, [("a",), ("c",)], {MEAN: [np.zeros(8), np.zeros(7)]})
        with pytest.raises(InternalError, match=r"array has shape \(7,\), expected \(8,\)"):
            writer.commit("default", [bad])
        other = CommitRows(digests, [("a",), ("c",)], {BOS: [np.zeros(8)] * 2})
        with pytest.raises(InternalError, match="stores"):
            writer.commit("default", [other])
        assert writer.lookup("default").record_count() == 0


def test_table_lookup_counts_digests_and_conflicts(store_path: Path) -> None:
    """The planner's and the validation's reader: empty answers for a table not in the store
    yet; once it holds records, stored digests, counts and an id remapped to another
    sequence (compared after the table's truncation)."""
    import dataclasses

    from gpuengine.records import FastaRecord

    spec = dataclasses.replace(make_spec(), max_residues=3)
    record = FastaRecord("p1", "MKVL", "in.fa", 1, 0)
    with StoreWriter(store_path) as writer:
        before = writer.lookup("default")
        assert before.spec is None and before.record_count() == before.embedding_count() == 0
        assert before.record_digests(["p1"]) == [None] and before.conflict(record) is None
        assert before.has_embeddings([sequence_digest("MKV")]) == [False]
        writer.open_table(spec)
        writer.commit("default", [entry("MKV", ("p1", "p2"), spec)])
        lookup = writer.lookup("default")
        assert lookup.spec == spec and (lookup.record_count(), lookup.embedding_count()) == (2, 1)
        assert lookup.record_digests(["p2", "p3"]) == [sequence_digest("MKV"), None]
        assert lookup.conflict(record) is None  # MKVL truncated to 3 residues is MKV
        problem = lookup.conflict(FastaRecord("p1", "MKA", "in.fa", 7, 3))
        assert problem.kind == "store-conflict" and problem.line == 7
        assert str(store_path) in problem.detail
