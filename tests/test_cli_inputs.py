"""What ``gpuengine embed`` does with its input, end to end in process with the tiny ESM-2: a bad
record or a bad file stops the run before the model loads, naming file, line, record and
character, and leaves an existing store unchanged; ``--skip-invalid`` skips and counts; gzip
and several files; ids with markup characters shown verbatim; a store conflict. The FASTA rules
themselves are unit-tested in test_fasta.py.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_runs import IDS, LAST, SEQS, cli, embed, fails, snapshot, standard_fasta
from conftest import assert_close, write_fasta
from gpuengine import EmbeddingStore


@pytest.fixture
def store(standard_store):
    """The standard input embedded once with default options (read-only for the tests)."""
    return standard_store


# name: (files as {file name: text}, substrings the message must hold ({f} = path of a.fa,
# {g} = path of b.fa), records skipped by --skip-invalid)
BAD_RECORDS = {
    "invalid-character": (
        {"a.fa": ">ok\nACDE\n>bad1 text\nACDEF\nAC1E\n"},
        ["{f}:5:3", "'bad1'", "invalid-character", "'1'"], {"bad1"}),
    "empty-record": (
        {"a.fa": ">e1 nothing here\n>ok\nACDE\n"},
        ["{f}:1", "'e1'", "empty-sequence"], {"e1"}),
    "empty-id": (
        {"a.fa": ">ok\nACDE\n>\nACDEF\n"},
        ["{f}:3", "<empty id>", "empty-id"], {""}),
    "two-sequences-one-id": (
        {"a.fa": ">d\nACDE\n>ok\nACDE\n>d\nACDEF\n"},
        ["{f}:5", "'d'", "conflicting-duplicate", "first given at {f}:1"], {"d"}),
    "two-sequences-one-id-two-files": (
        {"a.fa": ">d\nACDE\n>ok\nACDE\n", "b.fa": ">x\nKKK\n>d\nACDEF\n"},
        ["{g}:3", "'d'", "conflicting-duplicate", "first given at {f}:1"], {"d"}),
}


def write_inputs(tmp_path: Path, files: dict[str, str]) -> list[Path]:
    paths = []
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        paths.append(tmp_path / name)
    return paths


def fill(parts, tmp_path):
    return [p.format(f=tmp_path / "a.fa", g=tmp_path / "b.fa") for p in parts]


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_stops_before_the_model_loads(tiny_pt, tmp_path, case, no_model_build):
    files, parts, _ = BAD_RECORDS[case]
    inputs = write_inputs(tmp_path, files)
    err = fails(inputs, tiny_pt, tmp_path / "s.lmdb")
    for part in fill(parts, tmp_path):
        assert part in err, f"{part!r} not in the message:\n{err}"
    assert "--skip-invalid" in err
    assert no_model_build == [], "a model was built before the input was rejected"
    assert not (tmp_path / "s.lmdb").exists(), "a failed first run left a store behind"


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_leaves_an_existing_store_unchanged(tiny_pt, tmp_path, case, store):
    out = tmp_path / "s.lmdb"
    shutil.copytree(store["path"], out)
    before = snapshot(out)
    files, parts, _ = BAD_RECORDS[case]
    err = fails(write_inputs(tmp_path, files), tiny_pt, out)
    assert fill(parts, tmp_path)[0] in err
    assert snapshot(out) == before


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_skip_invalid_skips_and_counts(tiny_pt, tmp_path, case, no_model_build):
    files, _, skipped = BAD_RECORDS[case]
    inputs = write_inputs(tmp_path, files)
    summary = embed(inputs, tiny_pt, tmp_path / "s.lmdb", "--skip-invalid")
    assert summary["invalid_skipped"] >= 1
    with EmbeddingStore(tmp_path / "s.lmdb") as emb:
        stored = set(emb)
    assert stored and not stored & skipped
    assert summary["committed_records"] == len(stored) == summary["valid_records"]
    assert "ok" in stored


def test_skip_invalid_counts_every_kind(tiny_pt, tmp_path, reference):
    text = (">bad1\nAC1E\n"
            ">empty\n"
            ">\nACDE\n"
            ">sp|Q2|X_HUMAN\n" + SEQS[1] + "\n"
            ">bad2\nACDE\nAC DE#\n"
            ">P1\n" + SEQS[0] + "\n")
    fasta = tmp_path / "mixed.fa"
    fasta.write_text(text)
    summary = embed(fasta, tiny_pt, tmp_path / "s.lmdb", "--skip-invalid")
    assert summary["records_read"] == 6
    assert summary["invalid_skipped"] == 4
    assert summary["valid_records"] == summary["embedded"] == 2
    with EmbeddingStore(tmp_path / "s.lmdb") as emb:
        assert sorted(emb) == ["P1", "sp|Q2|X_HUMAN"]
        assert_close(emb["P1"], reference[LAST]["mean"][0], "P1")
        assert_close(emb["sp|Q2|X_HUMAN"], reference[LAST]["mean"][1], "Q2")


def test_skip_invalid_counts_every_skipped_record(tiny_pt, tmp_path):
    fasta = tmp_path / "a.fa"
    fasta.write_text(">d\nACDE\n>ok\nACDE\n>d\nACDEF\n")
    summary = embed(fasta, tiny_pt, tmp_path / "s.lmdb", "--skip-invalid")
    assert summary["records_read"] == 3 and summary["valid_records"] == 1
    # every record read is valid, a harmless repeat, or skipped as invalid
    assert (summary["valid_records"] + summary["duplicate_records"]
            + summary["invalid_skipped"]) == summary["records_read"]


# file-level problems: not skippable
BAD_FILES = {
    "not-fasta": (lambda p: p.write_text("id\tsequence\nP1\tACDE\n"), ["{f}:1", "not FASTA"]),
    "empty-file": (lambda p: p.write_bytes(b""), ["{f}", "empty"]),
    "blank-file": (lambda p: p.write_text("\n\n  \n"), ["{f}", "no FASTA records"]),
    "truncated-gzip": (lambda p: p.write_bytes(
        gzip.compress(("".join(f">r{i}\n{'ACDEFGHIKL' * 20}\n" for i in range(500))).encode(),
                      compresslevel=1)[:400]), ["{f}", "truncated or corrupt gzip"]),
    "missing-file": (lambda p: None, ["{f}", "cannot open", "No such file"]),
    "bzip2": (lambda p: p.write_bytes(__import__("bz2").compress(b">a\nACDE\n")), ["{f}", "bzip2"]),
    "not-utf8": (lambda p: p.write_bytes(b">a\nAC\xffDE\n"), ["{f}:2:3", "UTF-8"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
@pytest.mark.parametrize("skip", [False, True], ids=["stop", "skip-invalid"])
def test_bad_file_exits_1_naming_it(tiny_pt, tmp_path, case, skip, no_model_build):
    make, parts = BAD_FILES[case]
    good = standard_fasta(tmp_path / "good.fa")
    bad = tmp_path / "a.fa"
    make(bad)
    err = fails([good, bad], tiny_pt, tmp_path / "s.lmdb", *(["--skip-invalid"] if skip else []))
    for part in fill(parts, tmp_path):
        assert part in err, f"{part!r} not in the message:\n{err}"
    assert no_model_build == []
    assert not (tmp_path / "s.lmdb").exists()


def test_bad_file_leaves_an_existing_store_unchanged(tiny_pt, tmp_path, store):
    out = tmp_path / "s.lmdb"
    shutil.copytree(store["path"], out)
    before = snapshot(out)
    bad = tmp_path / "a.fa"
    BAD_FILES["truncated-gzip"][0](bad)
    fails([standard_fasta(tmp_path / "more.fa", ["N1"], ["ACDE"]), bad], tiny_pt, out)
    assert snapshot(out) == before


def test_same_input_file_twice_is_refused(tiny_pt, tmp_path):
    fasta = standard_fasta(tmp_path / "p.fa")
    err = fails([fasta, fasta], tiny_pt, tmp_path / "s.lmdb")
    assert "given twice" in err and str(fasta) in err


def test_bad_input_does_not_add_a_table_to_an_existing_store(tiny_pt, tmp_path, store):
    out = tmp_path / "s.lmdb"
    shutil.copytree(store["path"], out)
    before = snapshot(out)
    bad = tmp_path / "a.fa"
    bad.write_text(">x\nAC1E\n")
    fails(bad, tiny_pt, out, "--table", "other")
    assert snapshot(out) == before


def test_bad_input_is_reported_before_the_weights_are_read(tiny_pt, tmp_path, monkeypatch):
    import gpuengine.models.esm2_weights as weights

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the input was validated")

    monkeypatch.setattr(weights, "read_fair_esm_checkpoint", refuse)
    bad = tmp_path / "a.fa"
    bad.write_text(">x\nAC1E\n")
    err = fails(bad, tiny_pt, tmp_path / "s.lmdb")
    assert "invalid-character" in err


@pytest.mark.parametrize("rid", ["a[bold]b", "a[/]b", "x[red]y[/red]z"])
def test_messages_show_ids_with_brackets_verbatim(tiny_pt, tmp_path, rid):
    """Record ids, paths and file contents are data: never parsed as console markup."""
    fasta = tmp_path / "a.fa"
    fasta.write_text(f">{rid}\nAC1E\n")
    err = fails(fasta, tiny_pt, tmp_path / "s.lmdb")
    assert f"record {rid!r}" in err


def test_summary_shows_paths_with_brackets_verbatim(tiny_pt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a short relative --out, so the summary table does not wrap it
    Path("run[x]").mkdir()
    fasta = standard_fasta(tmp_path / "p.fa", ["P1"], ["ACDE"])
    result = cli("embed", fasta, "-m", tiny_pt, "-o", "run[x]/s.lmdb")
    assert result.exit_code == 0, result.stderr
    assert "run[x]" in result.stderr


def test_store_conflict_stops_and_skip_invalid_keeps_the_stored_sequence(
        tiny_pt, tmp_path, store, reference):
    out = tmp_path / "s.lmdb"
    shutil.copytree(store["path"], out)
    before = snapshot(out)
    fasta = write_fasta(tmp_path / "c.fa", [("new1", "ACDEFG"), ("P4", "KKKKLLLL")])
    err = fails(fasta, tiny_pt, out)
    assert f"{fasta}:3" in err and "'P4'" in err and "different sequence" in err
    assert snapshot(out) == before
    summary = embed(fasta, tiny_pt, out, "--skip-invalid")
    assert summary["invalid_skipped"] == 1 and summary["embedded"] == 1
    with EmbeddingStore(out) as emb:
        assert len(emb) == len(IDS) + 1 and "new1" in emb
        assert_close(emb["P4"], reference[LAST]["mean"][3], "P4 kept")


def test_gzip_input_and_several_files(tiny_pt, tmp_path, reference):
    half = len(IDS) // 2
    plain = standard_fasta(tmp_path / "one.fa", IDS[:half], SEQS[:half])
    packed = tmp_path / "two.fasta"  # gzip detected by content, not by name
    text = standard_fasta(tmp_path / "two.txt", IDS[half:], SEQS[half:]).read_bytes()
    packed.write_bytes(gzip.compress(text))
    named = tmp_path / "three.fa.gz"
    named.write_bytes(gzip.compress(b">Z1\n" + SEQS[0].encode() + b"*\n"))
    summary = embed([plain, packed, named], tiny_pt, tmp_path / "s.lmdb")
    assert summary["records_read"] == len(IDS) + 1
    assert summary["embedded"] == len(IDS) and summary["deduplicated"] == 1
    with EmbeddingStore(tmp_path / "s.lmdb") as emb:
        assert len(emb) == len(IDS) + 1
        got = emb.get_many(IDS)
        assert_close(got, reference[LAST]["mean"], "gzip + plain inputs")
        np.testing.assert_array_equal(emb["Z1"], emb["P1"])


def test_same_id_same_sequence_twice_is_embedded_once(tiny_pt, tmp_path, reference):
    a = write_fasta(tmp_path / "a.fa", [("P1", SEQS[0]), ("P4", SEQS[3]), ("P1", SEQS[0])])
    b = write_fasta(tmp_path / "b.fa", [("P4 again", SEQS[3].lower())])
    summary = embed([a, b], tiny_pt, tmp_path / "s.lmdb")
    assert summary["records_read"] == 4 and summary["duplicate_records"] == 2
    assert summary["valid_records"] == 2 and summary["embedded"] == 2
    assert summary["committed_records"] == 2
    assert summary["tokens"] == len(SEQS[0]) + len(SEQS[3]) + 4
    with EmbeddingStore(tmp_path / "s.lmdb") as emb:
        assert sorted(emb) == ["P1", "P4"]
        assert_close(emb["P4"], reference[LAST]["mean"][3], "P4")
