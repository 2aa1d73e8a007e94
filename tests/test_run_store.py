"""The store side of one run (gpuengine/run_store.py): the checks made before anything expensive,
the run's progress key, and removing a store the run created but never wrote to. Whole runs
against these rules are in test_engine.py and test_table_precision.py."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

from conftest import write_fasta
from gpuengine.config import EmbedConfig
from gpuengine.errors import StoreMismatchError
from gpuengine.run_store import RunStore, run_id
from gpuengine.store import CommitEntry, ModelIdentity, OutputSpec, StoreWriter, TableSpec
from gpuengine.store.codec import sequence_digest

MODEL = ModelIdentity(family="esm2", name="tiny", sha256="ab" * 32, num_layers=2, embed_dim=8,
                      attention_heads=2, vocab_size=33)
SPEC = TableSpec(name="default", model=MODEL, outputs=(OutputSpec(2, "mean"),),
                 store_dtype="float32", dim=8, max_residues=1022, precision="fp32")


def write_table(path, spec: TableSpec = SPEC) -> None:
    with StoreWriter(path) as writer:
        writer.open_table(spec)
        writer.commit(spec.name, [CommitEntry(sequence_digest("MKV"), ("p1",),
                                              {spec.outputs[0]: np.ones(8, np.float32)})])


def test_a_store_the_run_created_and_left_empty_is_removed(tmp_path):
    path = tmp_path / "new.lmdb"
    store = RunStore(path)
    assert store.created and path.is_dir()
    store.close(remove_if_empty=True)
    assert not path.exists()


def test_a_store_with_records_or_one_that_existed_is_kept(tmp_path):
    existing = tmp_path / "existing.lmdb"
    with StoreWriter(existing):
        pass  # an empty store the user made earlier
    store = RunStore(existing)
    assert not store.created
    store.close(remove_if_empty=True)
    assert (existing / "data.mdb").exists()

    written = tmp_path / "written.lmdb"
    store = RunStore(written)
    store.writer.open_table(SPEC)
    store.writer.commit(SPEC.name, [CommitEntry(sequence_digest("MKV"), ("p1",),
                                                {SPEC.outputs[0]: np.ones(8, np.float32)})])
    store.close(remove_if_empty=True)
    assert (written / "data.mdb").exists()


def test_check_passes_a_new_table_and_the_same_settings(tmp_path):
    path = tmp_path / "s.lmdb"
    write_table(path)
    store = RunStore(path)
    try:
        assert store.check("other", "bf16", "", 5).spec is None  # no such table yet
        lookup = store.check("default", "fp32", "", 1022)
        assert lookup.spec == SPEC
    finally:
        store.close(remove_if_empty=True)


@pytest.mark.parametrize("precision, max_residues, words", [
    ("fp16", 1022, ["fp16", "--table"]),
    ("fp32", None, ["max_residues", "--table"]),
    ("fp32", 500, ["truncated to 1022", "500"]),
])
def test_check_refuses_another_precision_or_truncation(tmp_path, precision, max_residues, words):
    path = tmp_path / "s.lmdb"
    write_table(path)
    store = RunStore(path)
    try:
        with pytest.raises(StoreMismatchError) as raised:
            store.check("default", precision, "", max_residues)
    finally:
        store.close(remove_if_empty=True)
    for word in words:
        assert word in str(raised.value)
    assert (path / "data.mdb").exists()  # refused, untouched


def test_the_run_id_names_the_table_and_the_input_files(tmp_path):
    fasta = write_fasta(tmp_path / "p.fa", [("p1", "MKV")])
    config = EmbedConfig(inputs=(fasta,), model="m", out=tmp_path / "s.lmdb")
    first = run_id(config, SPEC)
    assert run_id(config, SPEC) == first  # a rerun of the same files resumes the same record
    assert run_id(config, replace(SPEC, outputs=(OutputSpec(1, "mean"),))) != first
    stat = fasta.stat()
    os.utime(fasta, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert run_id(config, SPEC) != first  # the file changed: another run
