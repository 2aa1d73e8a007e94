"""The ``gpuengine`` command line, end to end on the CPU with a tiny random-weight ESM-2.

Every run goes through typer's CliRunner (in process, stdout and stderr captured apart) and the
stored vectors are compared with fair-esm's own forward (max |diff| <= 1e-5 at fp32).

The helpers (``cli``, ``embed``, ``fails``, ``snapshot``, the standard input) are in
cli_runs.py; what ``embed`` does with bad input (records, files, ``--skip-invalid``) is in
test_cli_inputs.py; every command's user errors, as real processes, in
test_cli_user_errors.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_runs import (DIM, IDS, LAST, SEQS, cli, embed, fails, info_outputs, snapshot,
                      standard_fasta)
from conftest import TINY, assert_close, fair_esm_reference, max_diff, write_fasta
from gpuengine import EmbeddingStore, __version__
from gpuengine.synthetic import write_fair_esm_checkpoint

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def store(standard_store):
    """The standard input embedded once with default options (read-only for the tests)."""
    return standard_store


# ----------------------------------------------------------------------------- basics


def test_version():
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"gpuengine {__version__}"


@pytest.mark.parametrize("command", ["embed", "lookup", "info", "export", "devices"])
def test_help_of_each_command_has_an_example(command):
    result = cli(command, "--help")
    assert result.exit_code == 0, result.stderr
    assert re.search(rf"Examples?: gpuengine {command}", result.stdout)


def test_top_level_help_lists_examples_and_exit_codes():
    result = cli("--help")
    assert result.exit_code == 0
    assert "gpuengine embed proteins.fasta.gz" in result.stdout
    assert "130" in result.stdout and "partial" in result.stdout


def test_devices_lists_the_cpu():
    result = cli("devices")
    assert result.exit_code == 0, result.stderr
    assert any(line.split("\t")[0] == "cpu" for line in result.stdout.splitlines())
    result = cli("devices", "--json")
    assert result.exit_code == 0, result.stderr
    devices = json.loads(result.stdout)
    cpu = [d for d in devices if d["device"] == "cpu"]
    assert len(cpu) == 1 and "CPU" in cpu[0]["name"]


# ----------------------------------------------------------------------------- embed → lookup


def test_embed_summary_on_stdout_logs_on_stderr(store):
    summary = store["summary"]
    assert summary["exit_code"] == 0 and not summary["interrupted"]
    assert summary["records_read"] == summary["valid_records"] == len(IDS)
    assert summary["embedded"] == summary["committed_records"] == len(IDS)
    assert summary["already_stored"] == summary["invalid_skipped"] == summary["truncated"] == 0
    assert summary["failed"] == [] and summary["synthetic_weights"] is True
    assert summary["model"] == "esm2_t2_tiny" and summary["table"] == "default"
    assert summary["tokens"] == sum(len(s) + 2 for s in SEQS)
    # progress, logs and the human summary went to stderr, not stdout (which parsed as JSON)
    assert "resolving model" in store["stderr"]
    assert "RANDOM" in store["stderr"] and "summary" in store["stderr"]


def test_model_build_spy_sees_a_real_run(tiny_pt, tmp_path, no_model_build):
    """The control for the ``no_model_build == []`` checks below: a good run builds one model."""
    embed(standard_fasta(tmp_path / "p.fa", IDS[:1], SEQS[:1]), tiny_pt, tmp_path / "s.lmdb")
    assert len(no_model_build) == 1


def test_embed_without_json_prints_nothing_on_stdout(tiny_pt, tmp_path):
    fasta = standard_fasta(tmp_path / "p.fa")
    result = cli("embed", fasta, "-m", tiny_pt, "-o", tmp_path / "s.lmdb")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "sequences embedded" in result.stderr
    result = cli("embed", fasta, "-m", tiny_pt, "-o", tmp_path / "s.lmdb", "--quiet")
    assert result.exit_code == 0 and result.stdout == ""


def test_lookup_json_matches_fair_esm(store, reference):
    result = cli("lookup", store["path"], *IDS, "--json")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(IDS)
    for i, (rid, line) in enumerate(zip(IDS, lines)):
        row = json.loads(line)
        assert row["id"] == rid
        assert row["layer"] == LAST and row["pool"] == "mean" and row["shape"] == [DIM]
        assert_close(row["embedding"], reference[LAST]["mean"][i], f"lookup --json {rid}")


def test_lookup_tsv_matches_fair_esm(store, reference):
    result = cli("lookup", store["path"], *IDS)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(IDS)
    with EmbeddingStore(store["path"]) as emb:
        for i, (rid, line) in enumerate(zip(IDS, lines)):
            fields = line.split("\t")
            assert fields[0] == rid and len(fields) == DIM + 1
            values = np.array(fields[1:], dtype=np.float32)
            assert_close(values, reference[LAST]["mean"][i], f"TSV {rid}")
            np.testing.assert_array_equal(values, emb[rid])  # the text reads back exactly


def test_lookup_layer_and_pool_options(store, reference):
    result = cli("lookup", store["path"], "P4", "--layer", "-1", "--pool", "mean", "--json")
    assert result.exit_code == 0, result.stderr
    assert_close(json.loads(result.stdout)["embedding"], reference[LAST]["mean"][3], "P4")
    result = cli("lookup", store["path"], "P4", "--pool", "bos")  # not stored
    assert result.exit_code == 2
    assert "bos" in result.stderr and "layer2/mean" in result.stderr
    assert result.stdout == ""


def test_lookup_missing_id_exits_1_and_names_it(store):
    result = cli("lookup", store["path"], "P1", "no-such-id", "--json")
    assert result.exit_code == 1
    assert "no-such-id" in result.stderr
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["P1"]


def test_lookup_and_info_of_a_missing_store_exit_1(tmp_path):
    for args in (["lookup", tmp_path / "none.lmdb", "P1"], ["info", tmp_path / "none.lmdb"]):
        result = cli(*args)
        assert result.exit_code == 1
        assert os.path.realpath(tmp_path / "none.lmdb") in result.stderr
    assert not (tmp_path / "none.lmdb").exists()


def test_error_messages_are_not_wrapped_in_quotes(store):
    """A KeyError turned into a usage error prints its text, not its repr."""
    result = cli("lookup", store["path"], "P1", "--table", "nope")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith("error: store") and "tables: default" in line
    assert not line.rstrip().endswith('"')


def test_info_json(store, tiny_pt):
    result = cli("info", store["path"], "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["schema_version"] >= 1 and data["engine_version"] == __version__
    assert list(data["tables"]) == ["default"]
    table = data["tables"]["default"]
    assert table["records"] == len(IDS) and table["embeddings"] == len(set(SEQS))
    spec = table["spec"]
    assert spec["model"]["name"] == "esm2_t2_tiny" and spec["model"]["family"] == "esm2"
    assert spec["model"]["num_layers"] == LAST and spec["dim"] == DIM
    assert len(spec["model"]["sha256"]) == 64
    assert spec["outputs"] == [{"layer": LAST, "pool": "mean"}]
    assert spec["max_residues"] == 1022 and spec["store_dtype"] == "float32"
    assert data["file_size"] > 0 and data["map_size"] >= data["file_size"]


def test_info_text(store):
    result = cli("info", store["path"])
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert f"path: {os.path.realpath(store['path'])}" in text
    assert "default:" in text and f"records: {len(IDS)}" in text and "esm2_t2_tiny" in text
    # one list item per output, its fields under it (not one "- " per field)
    assert info_outputs(text) == [[f"layer: {LAST}", "pool: mean"]]


# ----------------------------------------------------------------------------- export


def test_export_npz(store, tmp_path):
    out = tmp_path / "e.npz"
    result = cli("export", store["path"], "--format", "npz", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and f"exported {len(IDS)} embeddings" in result.stderr
    with np.load(out, allow_pickle=False) as data:
        ids = data["ids"]
        matrix = data["embeddings"]
        assert ids.dtype.kind == "U"
        assert int(data["layer"]) == LAST and str(data["pool"]) == "mean"
    assert sorted(ids.tolist()) == sorted(IDS) and matrix.shape == (len(IDS), DIM)
    assert matrix.dtype == np.float32
    with EmbeddingStore(store["path"]) as emb:
        np.testing.assert_array_equal(matrix, emb.get_many(ids.tolist()))


def test_export_npz_writes_the_file_named(store, tmp_path):
    """-o names the file written (numpy alone would append .npz to a name without it)."""
    out = tmp_path / "vectors.bin"
    result = cli("export", store["path"], "-o", out)
    assert result.exit_code == 0, result.stderr
    assert out.is_file() and not (tmp_path / "vectors.bin.npz").exists()
    assert str(out) in result.stderr
    with np.load(out, allow_pickle=False) as data:
        assert data["embeddings"].shape == (len(IDS), DIM)


def test_export_tsv(store, tmp_path):
    out = tmp_path / "e.tsv"
    result = cli("export", store["path"], "--format", "tsv", "-o", out)
    assert result.exit_code == 0, result.stderr
    rows = [line.split("\t") for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r[0] for r in rows) == sorted(IDS)
    with EmbeddingStore(store["path"]) as emb:
        for row in rows:
            assert len(row) == DIM + 1
            np.testing.assert_array_equal(np.array(row[1:], dtype=np.float32), emb[row[0]])


@pytest.mark.parametrize("fmt", ["npz", "tsv"])
def test_export_to_an_unwritable_path_exits_1(store, tmp_path, fmt):
    for target in (tmp_path / "no-such-dir" / "e.out", tmp_path):
        result = cli("export", store["path"], "-f", fmt, "-o", target)
        assert result.exit_code == 1, result.stderr
        assert f"cannot write {target}" in result.stderr
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_export_unknown_format_is_a_usage_error(store, tmp_path):
    result = cli("export", store["path"], "--format", "csv", "-o", tmp_path / "x.csv")
    assert result.exit_code == 2 and "npz, tsv" in result.stderr
    assert not (tmp_path / "x.csv").exists()


# ----------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("args,part", [
    (["--pool", "max"], "--pool 'max'"),
    (["--layers", "7"], "layers 0..2"),
    (["--layers", "x"], "--layers 'x'"),
    (["--layers", "1,-2"], "same layer twice"),
    (["--precision", "fp64"], "--precision 'fp64'"),
    (["--store-dtype", "int8"], "--store-dtype 'int8'"),
    (["--max-tokens", "4"], "--max-tokens"),
    (["--gpus", "zero"], "--gpus"),
])
def test_bad_option_is_a_usage_error(tiny_pt, tmp_path, args, part, no_model_build):
    fasta = standard_fasta(tmp_path / "p.fa")
    err = fails(fasta, tiny_pt, tmp_path / "s.lmdb", *args, code=2)
    assert part in err
    assert no_model_build == []
    assert not (tmp_path / "s.lmdb").exists()


def test_layers_minus_one_as_a_separate_argument(tiny_pt, tmp_path, reference):
    fasta = standard_fasta(tmp_path / "p.fa", IDS[:2], SEQS[:2])
    embed(fasta, tiny_pt, tmp_path / "s.lmdb", "--layers", "-1")
    with EmbeddingStore(tmp_path / "s.lmdb") as emb:
        assert emb.output.layer == LAST
        assert_close(emb.get_many(IDS[:2]), reference[LAST]["mean"][:2], "--layers -1")


# ----------------------------------------------------------------------------- models


@pytest.mark.slow
def test_hf_directory_gives_the_same_vectors_as_the_pt(tiny_pt, tiny_hf, tmp_path, store,
                                                        reference):
    fasta = standard_fasta(tmp_path / "p.fa")
    summary = embed(fasta, tiny_hf, tmp_path / "hf.lmdb")
    assert summary["embedded"] == len(IDS) and summary["model"] == tiny_hf.name
    with EmbeddingStore(tmp_path / "hf.lmdb") as hf, EmbeddingStore(store["path"]) as pt:
        ours = hf.get_many(IDS)
        assert_close(ours, reference[LAST]["mean"], "HF directory vs fair-esm")
        assert_close(ours, pt.get_many(IDS), "HF directory vs .pt", tol=1e-6)


def test_unknown_model_name_lists_the_known_names(tmp_path, no_model_build):
    fasta = standard_fasta(tmp_path / "p.fa")
    err = fails(fasta, "esm2_t99_1T_UR50D", tmp_path / "s.lmdb")
    assert "esm2_t99_1T_UR50D" in err and "known names" in err
    assert "esm2_t6_8M_UR50D" in err and "esm2_t33_650M_UR50D" in err
    assert not (tmp_path / "s.lmdb").exists()


def test_model_directory_without_config_is_refused(tmp_path):
    fasta = standard_fasta(tmp_path / "p.fa")
    (tmp_path / "model").mkdir()
    err = fails(fasta, tmp_path / "model", tmp_path / "s.lmdb")
    assert "config.json" in err and str(tmp_path / "model") in err


@pytest.mark.parametrize("how", ["env", "flag"])
def test_published_name_offline_says_where_to_put_the_file(tmp_path, monkeypatch, how):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    extra = []
    if how == "flag":  # --offline alone, without GPUENGINE_OFFLINE
        monkeypatch.delenv("GPUENGINE_OFFLINE")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        extra = ["--offline"]
    fasta = standard_fasta(tmp_path / "p.fa")
    err = fails(fasta, "esm2_t6_8M_UR50D", tmp_path / "s.lmdb", *extra)
    target = tmp_path / "torch" / "hub" / "checkpoints" / "esm2_t6_8M_UR50D.pt"
    assert str(target) in err
    assert "https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t6_8M_UR50D.pt" in err
    assert not target.exists() and not (tmp_path / "s.lmdb").exists()


def test_published_name_found_in_the_hub_cache_offline(tiny_pt, tmp_path, monkeypatch, reference):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    target = tmp_path / "torch" / "hub" / "checkpoints" / "esm2_t6_8M_UR50D.pt"
    target.parent.mkdir(parents=True)
    shutil.copyfile(tiny_pt, target)  # tiny weights under the published name
    fasta = standard_fasta(tmp_path / "p.fa", IDS[:3], SEQS[:3])
    summary = embed(fasta, "esm2_t6_8M_UR50D", tmp_path / "s.lmdb")
    assert summary["model"] == "esm2_t6_8M_UR50D"
    with EmbeddingStore(tmp_path / "s.lmdb") as emb:
        assert_close(emb.get_many(IDS[:3]), reference[LAST]["mean"][:3], "hub cache")


# ----------------------------------------------------------------------------- store mismatch


@pytest.fixture(scope="session")
def other_pt(tmp_path_factory) -> Path:
    """The tiny shape with other random weights (another sha256)."""
    return write_fair_esm_checkpoint(tmp_path_factory.mktemp("w2") / "esm2_t2_other.pt", *TINY,
                                     seed=4)


def test_other_model_needs_another_table(tiny_pt, other_pt, tmp_path, store, reference):
    out = tmp_path / "s.lmdb"
    shutil.copytree(store["path"], out)
    before = snapshot(out)
    err = fails(store["fasta"], other_pt, out)
    assert "sha256" in err and "--table" in err and "default" in err
    assert snapshot(out) == before

    summary = embed(store["fasta"], other_pt, out, "--table", "other")
    assert summary["table"] == "other" and summary["embedded"] == len(IDS)
    other_ref = fair_esm_reference(other_pt, SEQS, [LAST])[LAST]["mean"]
    assert max_diff(other_ref, reference[LAST]["mean"]) > 1e-2  # the models do differ
    with EmbeddingStore(out, table="other") as emb:
        assert_close(emb.get_many(IDS), other_ref, "table other")
    with EmbeddingStore(out) as emb:  # two tables: 'default' is the default
        assert emb.tables == ("default", "other")
        assert_close(emb.get_many(IDS), reference[LAST]["mean"], "table default")
    result = cli("lookup", out, "P5", "--table", "other", "--json")
    assert result.exit_code == 0, result.stderr
    assert_close(json.loads(result.stdout)["embedding"], other_ref[4], "lookup --table other")
    result = cli("info", out, "--json")
    assert set(json.loads(result.stdout)["tables"]) == {"default", "other"}


def test_other_outputs_or_dtype_need_another_table(tiny_pt, tmp_path, store):
    out = tmp_path / "s.lmdb"
    shutil.copytree(store["path"], out)
    before = snapshot(out)
    for extra, part in ((["--pool", "bos"], "outputs differ"),
                        (["--store-dtype", "float16"], "store dtype"),
                        (["--layers", "1"], "outputs differ")):
        err = fails(store["fasta"], tiny_pt, out, *extra)
        assert part in err and "--table" in err, err
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- odd arguments


@pytest.mark.parametrize("name", ["bad name", "x" * 65, "", "a/b", "ü"])
def test_bad_table_name_is_a_usage_error(tiny_pt, tmp_path, name, no_model_build):
    fasta = standard_fasta(tmp_path / "p.fa")
    err = fails(fasta, tiny_pt, tmp_path / "s.lmdb", "--table", name, code=2)
    assert "--table" in err and "1-64 characters" in err
    assert no_model_build == [] and not (tmp_path / "s.lmdb").exists()


def test_out_that_is_not_a_store_is_refused_and_left_alone(tiny_pt, tmp_path):
    fasta = standard_fasta(tmp_path / "p.fa")
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    err = fails(fasta, tiny_pt, plain)
    assert str(plain) in err and "not a gpuengine store" in err
    assert plain.read_text() == "keep me"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x").write_text("keep me too")
    err = fails(fasta, tiny_pt, folder)
    assert str(folder) in err and "not a gpuengine store" in err
    assert sorted(p.name for p in folder.iterdir()) == ["x"]


def test_repeated_pool_option_and_explicit_cpu(tiny_pt, tmp_path, reference):
    fasta = standard_fasta(tmp_path / "p.fa", IDS[:3], SEQS[:3])
    summary = embed(fasta, tiny_pt, tmp_path / "s.lmdb", "--pool", "mean", "--pool", "bos",
                    "--gpus", "cpu", "--precision", "fp32")
    assert [d["device"] for d in summary["devices"]] == ["cpu"]
    for pool in ("mean", "bos"):
        with EmbeddingStore(tmp_path / "s.lmdb", pool=pool) as emb:
            assert_close(emb.get_many(IDS[:3]), reference[LAST][pool][:3], pool)


def test_only_invalid_records_with_skip_invalid(tiny_pt, tmp_path):
    fasta = tmp_path / "bad.fa"
    fasta.write_text(">a\nAC1E\n>b\n")
    summary = embed(fasta, tiny_pt, tmp_path / "s.lmdb", "--skip-invalid")
    assert summary["records_read"] == 2 and summary["invalid_skipped"] == 2
    assert summary["valid_records"] == summary["embedded"] == summary["committed_records"] == 0


def test_long_and_odd_ids_round_trip(tiny_pt, tmp_path, reference):
    long_id = "L" * 700 + "|end"  # longer than LMDB's 511-byte key limit
    ids = [long_id, "日本語-id", "x:1;2=3"]
    fasta = write_fasta(tmp_path / "p.fa", list(zip(ids, SEQS[:3])))
    embed(fasta, tiny_pt, tmp_path / "s.lmdb")
    with EmbeddingStore(tmp_path / "s.lmdb") as emb:
        assert sorted(emb) == sorted(ids) and long_id in emb
        assert_close(emb.get_many(ids), reference[LAST]["mean"][:3], "odd ids")
    result = cli("lookup", tmp_path / "s.lmdb", long_id, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["id"] == long_id
    result = cli("export", tmp_path / "s.lmdb", "-o", tmp_path / "e.npz")
    with np.load(tmp_path / "e.npz", allow_pickle=False) as data:
        assert sorted(data["ids"].tolist()) == sorted(ids)


def test_incomplete_hf_config_is_a_model_error(tmp_path):
    fasta = standard_fasta(tmp_path / "p.fa")
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "esm"}')
    err = fails(fasta, model, tmp_path / "s.lmdb")
    assert "config.json" in err


def test_model_file_that_is_not_a_checkpoint(tmp_path):
    fasta = standard_fasta(tmp_path / "p.fa")
    err = fails(fasta, fasta, tmp_path / "s.lmdb")
    assert str(fasta) in err and "checkpoint" in err
    assert "weights_only" not in err and "file an issue" not in err
