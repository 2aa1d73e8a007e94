"""``gpuengine export --format hdf5 | fair-esm``: the layouts bio_embeddings/ProtTrans and
fair-esm's ``scripts/extract.py`` write, read back with h5py and ``torch.load(weights_only=True)``
and compared with the store bit for bit; the fair-esm files of a real run also against fair-esm's
own forward, pooled as extract.py pools (fp32, 1e-5)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import gpuengine
from cli_runs import cli
from conftest import fair_esm_reference, isolated_cache, random_proteins, write_fasta
from gpuengine import EmbeddingStore
from gpuengine.export import hdf5_names
from gpuengine.store import CommitEntry, ModelIdentity, OutputSpec, StoreWriter, TableSpec
from gpuengine.store.codec import sequence_digest

ESM_OUTPUTS = (OutputSpec(6, "mean"), OutputSpec(3, "mean"), OutputSpec(6, "bos"),
               OutputSpec(6, "per-token"))
ESM_IDS = ["P1", "sp|Q2|X_HUMAN", "dir/sub", "Ä-unicode", "P5"]
DNA_IDS = ["read_1", "read_2", "read_3"]


def _spec(name: str, outputs, dtype: str, dim: int) -> TableSpec:
    model = ModelIdentity(family="esm2", name=f"model_{name}", sha256="cd" * 32, num_layers=6,
                          embed_dim=dim, attention_heads=4, vocab_size=33)
    return TableSpec(name=name, model=model, outputs=tuple(outputs), store_dtype=dtype, dim=dim,
                     max_residues=1022)


def write_store(path: Path, tables: dict[str, tuple[TableSpec, list[str]]]) -> Path:
    """A store with one table per item, each id its own sequence, deterministic vectors."""
    with StoreWriter(path) as writer:
        for name, (spec, ids) in tables.items():
            writer.open_table(spec)
            entries = []
            for i, rid in enumerate(ids):
                rng = np.random.default_rng(hash((name, i)) % 2**32)
                vectors = {o: rng.standard_normal((i + 2, spec.dim) if o.per_token else spec.dim)
                           for o in spec.outputs}
                entries.append(CommitEntry(sequence_digest(f"{name}{i}"), (rid,), vectors))
            writer.commit(name, entries)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Two tables and none named default, like a predict store: ``esm`` (float32, four outputs,
    per-token included) and ``dnabert`` (float16, one output)."""
    return write_store(tmp_path_factory.mktemp("export") / "multi.lmdb", {
        "esm": (_spec("esm", ESM_OUTPUTS, "float32", 8), ESM_IDS),
        "dnabert": (_spec("dnabert", [OutputSpec(6, "mean")], "float16", 12), DNA_IDS)})


def stored(path: Path, table: str, output: OutputSpec) -> dict[str, np.ndarray]:
    with EmbeddingStore(path, table=table, layer=output.layer, pool=output.pool) as emb:
        return dict(emb.items())


def export(*args, code: int = 0) -> str:
    result = cli("export", *args)
    assert result.exit_code == code, result.stderr
    return result.stderr


# ----------------------------------------------------------------------------- HDF5


@pytest.mark.parametrize("table, output", [("esm", ESM_OUTPUTS[0]), ("esm", ESM_OUTPUTS[1]),
                                           ("esm", ESM_OUTPUTS[3]),
                                           ("dnabert", OutputSpec(6, "mean"))])
def test_hdf5_holds_one_dataset_per_id_exactly_as_stored(store, tmp_path, table, output):
    out = tmp_path / "embeddings.h5"
    message = export(store, "-f", "hdf5", "-o", out, "--table", table, "--layer", output.layer,
                     "--pool", output.pool)
    assert f"table {table}, {output.label}" in message
    want = stored(store, table, output)
    with h5py.File(out, "r") as f:
        assert f.attrs["table"] == table and f.attrs["layer"] == output.layer
        assert f.attrs["pool"] == output.pool and f.attrs["model_sha256"] == "cd" * 32
        by_id = {ds.attrs["original_id"]: ds for ds in f.values()}
        assert sorted(by_id) == sorted(want)
        for rid, array in want.items():
            ds = by_id[rid]
            assert ds.dtype == array.dtype and ds.shape == array.shape
            np.testing.assert_array_equal(ds[()], array)
            assert ds.attrs["model"] == f"model_{table}" and ds.attrs["layer"] == output.layer
            assert ds.attrs["pool"] == output.pool
        # ProtTrans-style readers index by id: every id without '/' is its own dataset name
        for rid in want:
            if "/" not in rid:
                np.testing.assert_array_equal(f[rid][()], want[rid])
    assert [p.name for p in tmp_path.iterdir()] == ["embeddings.h5"]  # no partial file left


def test_hdf5_names_of_ids_hdf5_cannot_hold():
    ids = ["a/b", "a_b", ".", "..", "x/y/z", "a/b_2"]
    names = hdf5_names(ids)
    assert names == {"a/b": "a_b_2", "a_b": "a_b", ".": "_", "..": "__", "x/y/z": "x_y_z",
                     "a/b_2": "a_b_2_2"}
    assert len(set(names.values())) == len(ids)


def test_hdf5_keeps_ids_with_slashes_and_collisions(tmp_path):
    ids = ["a/b", "a_b", "."]
    path = write_store(tmp_path / "odd.lmdb",
                       {"default": (_spec("default", [OutputSpec(6, "mean")], "float32", 4), ids)})
    export(path, "-f", "hdf5", "-o", tmp_path / "odd.h5")
    want = stored(path, "default", OutputSpec(6, "mean"))
    with h5py.File(tmp_path / "odd.h5", "r") as f:
        assert sorted(f) == ["_", "a_b", "a_b_2"]
        got = {ds.attrs["original_id"]: ds[()] for ds in f.values()}
    assert sorted(got) == sorted(ids)
    for rid in ids:
        np.testing.assert_array_equal(got[rid], want[rid])


@pytest.mark.parametrize("fmt", ["hdf5", "fair-esm"])
def test_export_to_an_unwritable_path_exits_1(store, tmp_path, fmt):
    target = tmp_path / "no-such-dir" / "out"
    assert f"cannot write {target}" in export(store, "--table", "esm", "-f", fmt, "-o", target,
                                              code=1)
    assert list(tmp_path.iterdir()) == []


def test_hdf5_without_h5py_is_a_clean_error(store, tmp_path):
    """h5py is an optional extra: without it, one line saying how to install it."""
    out = tmp_path / "x.h5"
    code = ("import sys; sys.modules['h5py'] = None; sys.argv[0] = 'gpuengine'; "
            "from gpuengine.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code, "export", str(store), "--table", "esm",
                             "-f", "hdf5", "-o", str(out)], capture_output=True, text=True,
                            timeout=120, cwd=Path(gpuengine.__file__).resolve().parent.parent)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "pip install 'gpuengine[hdf5]'" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- fair-esm


def load_pt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_fair_esm_files_hold_every_output_exactly_as_stored(store, tmp_path):
    out = tmp_path / "esm_out"
    export(store, "-f", "fair-esm", "-o", out, "--table", "esm")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.pt"))
    assert files == sorted(f"{rid}.pt" for rid in ESM_IDS)  # "dir/sub" → dir/sub.pt, as extract.py
    want = {o: stored(store, "esm", o) for o in ESM_OUTPUTS}
    for rid in ESM_IDS:
        data = load_pt(out / f"{rid}.pt")
        assert list(data) == ["label", "representations", "mean_representations",
                              "bos_representations"]  # extract.py's order
        assert data["label"] == rid
        assert sorted(data["mean_representations"]) == [3, 6]
        assert list(data["bos_representations"]) == [6] and list(data["representations"]) == [6]
        for o in ESM_OUTPUTS:
            key = {"mean": "mean_representations", "bos": "bos_representations",
                   "per-token": "representations"}[o.pool]
            tensor = data[key][o.layer]
            assert tensor.dtype == torch.float32
            assert torch.equal(tensor, torch.from_numpy(want[o][rid]))
            # its own storage (extract.py clones): the file holds this tensor only
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_fair_esm_layer_and_pool_select_outputs(store, tmp_path):
    out = tmp_path / "sel"
    assert "layer6/bos" in export(store, "-f", "fair-esm", "-o", out, "--table", "esm",
                                  "--pool", "bos")
    data = load_pt(out / "P1.pt")
    assert list(data) == ["label", "bos_representations"]
    assert list(data["bos_representations"]) == [6]
    out = tmp_path / "half"
    export(store, "-f", "fair-esm", "-o", out, "--table", "dnabert")
    data = load_pt(out / "read_2.pt")
    want = stored(store, "dnabert", OutputSpec(6, "mean"))["read_2"]
    assert data["mean_representations"][6].dtype == torch.float16
    assert torch.equal(data["mean_representations"][6], torch.from_numpy(want))


def test_fair_esm_into_an_existing_directory_keeps_other_files(store, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "other.pt").write_bytes(b"not ours")
    (out / "P1.pt").write_bytes(b"stale")
    export(store, "-f", "fair-esm", "-o", out, "--table", "esm", "--pool", "mean")
    assert (out / "other.pt").read_bytes() == b"not ours"
    assert load_pt(out / "P1.pt")["label"] == "P1"
    assert not [p for p in out.rglob("*") if "partial" in p.name]


def test_fair_esm_refuses_ids_that_leave_the_directory(store, tmp_path):
    for i, bad in enumerate(["..", "a/../b", "/abs", "a//b"]):
        path = write_store(tmp_path / f"bad{i}.lmdb", {"default": (
            _spec("default", [OutputSpec(6, "mean")], "float32", 4), ["fine", bad])})
        out = tmp_path / f"out{i}"
        message = export(path, "-f", "fair-esm", "-o", out, code=1)
        assert repr(bad) in message and "--format hdf5" in message
        assert not out.exists()
    (tmp_path / "afile").write_text("x")
    assert "not a directory" in export(store, "--table", "esm", "-f", "fair-esm", "-o",
                                       tmp_path / "afile", code=1)
    assert (tmp_path / "afile").read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_fair_esm_export_of_a_real_run_reads_like_extract_py(tiny_pt, tmp_path):
    """embed the tiny ESM-2 at layers 1 and 2 with mean, bos and per-token; the exported files
    are what extract.py --repr_layers 1 2 --include mean bos per_tok writes, within 1e-5."""
    ids = ["seq1", "seq2", "seq3"]
    seqs = random_proteins([9, 31, 70], seed=11)
    fasta = write_fasta(tmp_path / "p.fa", list(zip(ids, seqs)))
    with isolated_cache(tmp_path / "cache"):
        result = cli("embed", fasta, "-m", tiny_pt, "-o", tmp_path / "s.lmdb", "--layers", "1,2",
                     "--pool", "mean,bos,per-token", "-q")
    assert result.exit_code == 0, result.stderr
    export(tmp_path / "s.lmdb", "-f", "fair-esm", "-o", tmp_path / "out")
    ref = fair_esm_reference(tiny_pt, seqs, [1, 2])
    for i, rid in enumerate(ids):
        data = load_pt(tmp_path / "out" / f"{rid}.pt")
        assert data["label"] == rid
        for layer in (1, 2):
            np.testing.assert_allclose(data["mean_representations"][layer].numpy(),
                                       ref[layer]["mean"][i], atol=1e-5, rtol=0)
            np.testing.assert_allclose(data["bos_representations"][layer].numpy(),
                                       ref[layer]["bos"][i], atol=1e-5, rtol=0)
            np.testing.assert_allclose(data["representations"][layer].numpy(),
                                       ref[layer]["per-token"][i], atol=1e-5, rtol=0)
