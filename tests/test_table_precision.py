"""The compute precision is part of a table's identity (docs/store.md, "Compute precision").

fp16 and bf16 vectors differ from fp32 ones far beyond fp32's tolerance, so one table holds one
precision: a run of another precision is refused before it reads anything (exit 1, the message
names both precisions and says to pass ``--precision`` or use another ``--table``), and nothing
committed is touched. Tables written before the precision was recorded stay readable and
writable: their run records show what they hold, and the first run that matches records it.

Everything runs through the real CLI (in process) into real LMDB stores with the tiny
random-weight ESM-2; the old format is made by rewriting the table record as the previous
version wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import random_proteins, write_fasta
from gpuengine.cli import app
from gpuengine.errors import StoreMismatchError
from gpuengine.store.environment import open_store
from gpuengine.store.reader import EmbeddingStore
from gpuengine.store.schema import OutputSpec, TableSpec
from gpuengine.store.writer import StoreWriter

IDS = [f"P{i}" for i in range(6)]
SEQS = random_proteins([12, 30, 7, 25, 40, 18], seed=13)
OLD_TABLE_KEYS = {"name", "model", "model_fingerprint", "outputs", "store_dtype", "dim",
                  "max_residues"}
"""The keys of a table record before the compute precision was part of it."""


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def embed(fasta: Path, model: Path, out: Path, *extra, code: int = 0):
    result = cli("embed", fasta, "--model", model, "--out", out, "--gpus", "cpu", "-q", *extra)
    assert result.exit_code == code, f"exit {result.exit_code}, wanted {code}:\n{result.output}"
    assert "Traceback" not in result.output
    return result


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, Path]:
    """Two halves of one protein set: the first is embedded, then the second resumes it."""
    first = write_fasta(tmp_path / "first.fa", list(zip(IDS[:3], SEQS[:3])))
    second = write_fasta(tmp_path / "second.fa", list(zip(IDS[3:], SEQS[3:])))
    return first, second


def table_names(store: Path) -> list[str]:
    env = open_store(store, writer=False)
    try:
        meta = env.db("meta")
        return json.loads(env.read(lambda txn: bytes(txn.get(b"store", db=meta))))["tables"]
    finally:
        env.close()


def snapshot(store: Path) -> dict:
    """What a reader sees: table records, counts, run records and every vector."""
    with EmbeddingStore(store, table=table_names(store)[0]) as emb:
        tables = emb.info()["tables"]
        runs = emb.runs()
    vectors = {}
    for name in tables:
        with EmbeddingStore(store, table=name) as emb:
            vectors[name] = {rid: vector.tolist() for rid, vector in emb.items()}
    return {"tables": tables, "runs": runs, "vectors": vectors}


def table_record(store: Path, table: str = "default") -> dict:
    env = open_store(store, writer=False)
    try:
        meta = env.db("meta")
        raw = env.read(lambda txn: bytes(txn.get(f"table:{table}".encode(), db=meta)))
    finally:
        env.close()
    return json.loads(raw)


def as_the_previous_version_wrote_it(store: Path, drop_runs: bool = False) -> None:
    """Rewrite every table record with the keys the previous version wrote (no precision);
    ``drop_runs``: also forget the run records (a store written through the writer API)."""
    env = open_store(store, writer=True)

    def work(txn) -> None:
        meta = env.db_in(txn, "meta")
        for name in json.loads(bytes(txn.get(b"store", db=meta)))["tables"]:
            key = f"table:{name}".encode()
            record = json.loads(bytes(txn.get(key, db=meta)))
            assert set(record) == OLD_TABLE_KEYS | {"precision"}
            txn.put(key, json.dumps({k: record[k] for k in OLD_TABLE_KEYS}).encode(), db=meta)
        if drop_runs:
            txn.drop(env.db_in(txn, "runs"), delete=False)

    try:
        env.write(work)
    finally:
        env.close()


def test_another_precision_is_refused_and_the_same_one_resumes(tiny_pt, tmp_path, inputs):
    first, second = inputs
    out = tmp_path / "s.lmdb"
    embed(first, tiny_pt, out, "--precision", "fp32")
    assert table_record(out)["precision"] == "fp32"
    before = snapshot(out)

    err = embed(second, tiny_pt, out, "--precision", "bf16", code=1).output
    assert "table 'default' holds embeddings computed in fp32" in err
    assert "this run computes in bf16" in err and "pass --precision fp32" in err
    assert "--table NAME" in err
    assert snapshot(out) == before  # nothing committed, no run record, table unchanged

    embed(first, tiny_pt, out, "--precision", "bf16", "--table", "half")  # another table: fine
    with EmbeddingStore(out, table="half") as half, EmbeddingStore(out) as full:
        assert half.spec.precision == "bf16" and full.spec.precision == "fp32"
        gap = np.abs(half.get_many(IDS[:3]) - full.get_many(IDS[:3])).max()
    assert gap > 1e-4  # why they must not share a table: far beyond fp32's 1e-5

    embed(second, tiny_pt, out)  # the CPU's default is fp32: resumes the table
    with EmbeddingStore(out) as full:
        assert sorted(full) == sorted(IDS) and full.spec.precision == "fp32"
        np.testing.assert_array_equal(full.get_many(IDS[:3]),
                                      np.array([before["vectors"]["default"][i] for i in IDS[:3]],
                                               dtype=np.float32))


def test_a_table_computed_at_the_gpu_default_refuses_the_cpu_default(tiny_pt, tmp_path, inputs):
    """Started on GPUs (fp16 by default), finished on a CPU (fp32 by default): refused, with
    the way out (here the fp16 run stands in for the GPU run: same precision)."""
    first, second = inputs
    out = tmp_path / "s.lmdb"
    embed(first, tiny_pt, out, "--precision", "fp16")
    before = snapshot(out)
    err = embed(second, tiny_pt, out, code=1).output
    assert "computed in fp16" in err and "this run computes in fp32 (the default on the CPU, " \
        "as no --precision was given)" in err
    assert "pass --precision fp16" in err and "--table NAME" in err
    assert snapshot(out) == before
    embed(second, tiny_pt, out, "--precision", "fp16")
    with EmbeddingStore(out) as emb:
        assert sorted(emb) == sorted(IDS) and emb.spec.precision == "fp16"


def test_a_gpu_run_defaults_to_fp16_and_is_refused_on_an_fp32_table(tiny_pt, tmp_path, inputs,
                                                                    monkeypatch):
    """The other way round, as it would go on a GPU machine (its devices stand in here: the
    refusal comes before anything touches a device)."""
    import torch

    import gpuengine.replicas as replicas

    first, second = inputs
    out = tmp_path / "s.lmdb"
    embed(first, tiny_pt, out)
    before = snapshot(out)
    monkeypatch.setattr(replicas, "parse_devices", lambda spec: [torch.device("cuda", 0)])
    result = cli("embed", second, "--model", tiny_pt, "--out", out, "-q")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "computed in fp32; this run computes in fp16 (the default on the GPU, as no " \
        "--precision was given)" in result.output and "pass --precision fp32" in result.output
    assert snapshot(out) == before


def test_an_old_store_stays_readable_and_resumes_at_the_precision_its_runs_show(
        tiny_pt, tmp_path, inputs):
    first, second = inputs
    out = tmp_path / "s.lmdb"
    embed(first, tiny_pt, out)
    vectors = snapshot(out)["vectors"]
    as_the_previous_version_wrote_it(out)
    assert "precision" not in table_record(out)

    old = snapshot(out)
    assert old["vectors"] == vectors
    with EmbeddingStore(out) as emb:
        assert emb.spec.precision is None and len(emb) == 3
    result = cli("info", out, "--json")
    assert result.exit_code == 0 and "precision" not in json.loads(
        result.stdout)["tables"]["default"]["spec"]

    err = embed(second, tiny_pt, out, "--precision", "bf16", code=1).output
    assert "computed in fp32 (by its run records)" in err and "pass --precision fp32" in err
    assert "--table NAME" in err
    assert snapshot(out) == old

    embed(second, tiny_pt, out)  # fp32, as its runs show: resumed, and the table records it
    assert table_record(out)["precision"] == "fp32"
    with EmbeddingStore(out) as emb:
        assert sorted(emb) == sorted(IDS)
        assert {rid: emb[rid].tolist() for rid in IDS[:3]} == vectors["default"]


def spec(precision: str | None) -> TableSpec:
    from gpuengine.store.schema import ModelIdentity

    model = ModelIdentity(family="esm2", name="m", sha256="ab" * 32, num_layers=2, embed_dim=4,
                          attention_heads=2, vocab_size=33)
    return TableSpec(name="default", model=model, outputs=(OutputSpec(2, "mean"),),
                     store_dtype="float32", dim=4, max_residues=None, precision=precision)


def test_an_old_table_nothing_shows_the_precision_of_takes_the_first_run_s(tmp_path):
    """A table whose record predates the field and whose store has no engine run record (it
    was written through the writer API): the first run's precision is recorded, then kept."""
    out = tmp_path / "s.lmdb"
    with StoreWriter(out) as writer:
        writer.open_table(spec("fp32"))
    as_the_previous_version_wrote_it(out, drop_runs=True)
    with StoreWriter(out) as writer:
        assert writer.check_table(spec("bf16")).precision is None  # a check records nothing
        assert writer.stored_spec("default").precision is None
        writer.open_table(spec("bf16"))
        assert writer.stored_spec("default").precision == "bf16"
        with pytest.raises(StoreMismatchError, match=r"compute precision differs \(store: "
                                                     r"bf16, run: fp32\).*--precision bf16"):
            writer.open_table(spec("fp32"))
        with pytest.raises(StoreMismatchError, match="computed in bf16; this run computes in "
                                                     "fp32, and one table holds one precision"):
            writer.check_precision("default", "fp32")
        writer.check_precision("default", "bf16")
        writer.check_precision("other", "fp32")  # no such table: nothing to refuse


def test_predict_tables_carry_the_precision(tmp_path, predict_models):
    esm, dna, _, mlp_path = predict_models
    reads = tmp_path / "reads.fa"
    reads.write_text(">r1\n" + "ATGGCT" * 40 + "\n>r2\n" + "ATGAAACCC" * 30 + "\n")
    store = tmp_path / "store.lmdb"
    args = ["predict", reads, "--length", "500", "--classifier", mlp_path,
            "--esm-model", esm, "--dnabert-model", dna, "--store", store, "--gpus", "cpu",
            "--offline", "-q"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert table_record(store, "dnabert")["precision"] == "fp32"
    assert table_record(store, "esm")["precision"] == "fp32"
    before = snapshot(store)
    result = cli(*args, "--precision", "bf16")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "computed in fp32" in result.output and "pass --precision fp32" in result.output
    assert snapshot(store) == before
