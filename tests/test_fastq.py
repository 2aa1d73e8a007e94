"""FASTQ input (``gpuengine.fastq``): read by content (plain or gzip, whatever the file is
called), qualities checked for framing and length and then ignored; a malformed record is an
error naming file, line and column; ``embed`` and ``predict`` from FASTQ store and predict
exactly what they do from the same reads as FASTA."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest

from gpuengine.errors import InputError
from gpuengine.fasta import iter_records, stream_valid, validate
from gpuengine.synthetic import write_dnabert_s
from cli_runs import cli, snapshot
from fastq_files import fasta_text, fastq_text
from virnucpro_files import read_predictions, reads_fasta

DNA = frozenset("ACGTNRYSWKMBDHV")


def _reads(n: int = 30, seed: int = 4) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"read{i}", "".join(rng.choice("ACGT") for _ in range(rng.randint(1, 400))))
            for i in range(n)]


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("name", ["reads.fastq", "reads.fq.gz", "reads.txt", "reads"])
def test_fastq_is_read_by_content_plain_or_gzip(tmp_path, name):
    reads = _reads()
    path = tmp_path / name
    text = fastq_text(reads, plus_title=True)
    if name.endswith(".gz") or name == "reads":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    got = [(rec.id, rec.sequence, rec.line, problem) for rec, problem in iter_records(path)]
    assert got == [(rid, seq, 1 + 4 * i, None) for i, (rid, seq) in enumerate(reads)]


def test_fastq_records_equal_fasta_records_through_both_passes(tmp_path):
    reads = _reads() + [("lower", "acgtn"), ("star", "ACGT*")]
    fq, fa = tmp_path / "r.fq", tmp_path / "r.fa"
    fq.write_text(fastq_text(reads).replace("\n", "\r\n"))  # CRLF files too
    fa.write_text(fasta_text(reads))
    for path in (fq, fa):
        report = validate([path], alphabet=DNA)
        assert report.records == len(reads) and report.problem_count == 0
    got = [[(r.id, r.sequence) for r in stream_valid([p], validate([p], alphabet=DNA),
                                                        alphabet=DNA)] for p in (fq, fa)]
    assert got[0] == got[1]
    assert got[0][-2:] == [("lower", "ACGTN"), ("star", "ACGT")]


def test_bad_residue_in_fastq_is_a_record_problem_with_its_column(tmp_path):
    path = tmp_path / "r.fq"
    path.write_text("@a\nACGT\n+\nIIII\n@b x\nACUGT\n+\nIIIII\n")
    with pytest.raises(InputError) as err:
        validate([path], alphabet=DNA)
    assert f"{path}:6:3" in str(err.value) and "'U'" in str(err.value)
    report = validate([path], alphabet=DNA, skip_invalid=True)
    assert report.valid == 1 and report.skip == {(str(path), 1)}


MALFORMED = {
    "missing-plus": ("@a\nACGT\nIIII\n@b\nAC\n+\nII\n", ":3:1:", "expected the '+' separator"),
    "short-quality": ("@a\nACGT\n+\nIIII\n@b\nACGTAC\n+\nIII\n", ":8:4:",
                      "3 characters and the sequence 6"),
    "long-quality": ("@a\nACG\n+\nIIIII\n", ":4:4:", "5 characters and the sequence 3"),
    "truncated": ("@a\nACGT\n+\nIIII\n@b\nACGT\n", ":6:", "ends after its sequence line"),
    "no-at": ("@a\nACGT\n+\nIIII\nb\nACGT\n+\nIIII\n", ":5:1:", "expected a header line"),
    "multi-line": ("@a\nACGT\nACGT\n+\nIIIIIIII\n", ":3:1:", "multi-line FASTQ"),
    "blank-between": ("@a\nAC\n+\nII\n\n@b\nAC\n+\nII\n", ":5:", "blank line between"),
    "other-title": ("@a x\nAC\n+b\nII\n", ":3:2:", "another title"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_fastq_names_file_line_and_column(tmp_path, case):
    text, place, words = MALFORMED[case]
    path = tmp_path / "bad.fastq.gz"
    path.write_bytes(gzip.compress(text.encode()))
    with pytest.raises(InputError) as err:
        validate([path], alphabet=DNA, skip_invalid=True)  # framing errors are never skipped
    message = str(err.value)
    assert message.startswith(f"{path}{place}"), message
    assert words in message


def test_blank_lines_after_the_last_record_are_allowed(tmp_path):
    path = tmp_path / "r.fq"
    path.write_text("\n@a\nAC\n+\nII\n\n  \n")
    assert [(r.id, r.line) for r, _ in iter_records(path)] == [("a", 2)]


# ----------------------------------------------------------------------------- embed, predict


@pytest.fixture(scope="module")
def dnabert(tmp_path_factory):
    return write_dnabert_s(tmp_path_factory.mktemp("fq-dna") / "dnabert", num_layers=2,
                           embed_dim=48, heads=4, intermediate=96, seed=5)


@pytest.mark.parametrize("process", ["0", "1"])
def test_embed_from_fastq_equals_embed_from_fasta(tmp_path, dnabert, monkeypatch, process):
    monkeypatch.setenv("GPUENGINE_INPUT_PROCESS", process)  # in-thread and child reader
    reads = _reads(60)
    fq, fa = tmp_path / "reads.fq.gz", tmp_path / "reads.fa"
    fq.write_bytes(gzip.compress(fastq_text(reads).encode()))
    fa.write_text(fasta_text(reads))
    for path, out in ((fq, "q.lmdb"), (fa, "a.lmdb")):
        result = cli("embed", path, "-m", dnabert, "-o", tmp_path / out, "--json",
                     "--gpus", "cpu")
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["embedded"] == len(reads)
    q, a = snapshot(tmp_path / "q.lmdb")["vectors"], snapshot(tmp_path / "a.lmdb")["vectors"]
    assert q.keys() == a.keys()
    for key in q:  # which reads share a packed batch follows timing: the last bits may differ
        assert sorted(q[key]) == sorted(a[key]) == sorted(rid for rid, _ in reads)
        for rid, data in q[key].items():
            ours, ref = np.frombuffer(data, np.float32), np.frombuffer(a[key][rid], np.float32)
            assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1e-5, (key, rid)


def test_embed_of_malformed_fastq_exits_1_without_traceback(tmp_path, dnabert):
    path = tmp_path / "bad.fq"
    path.write_text("@a\nACGT\n+\nIII\n")
    result = cli("embed", path, "-m", dnabert, "-o", tmp_path / "s.lmdb", "--gpus", "cpu")
    assert result.exit_code == 1
    assert f"{path}:4:4:" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s.lmdb").exists() or result.stdout == ""


def _predict(args):
    result = cli("predict", *args, "--gpus", "cpu", "--offline", "-q", "--json")
    assert result.exit_code == 0, result.stderr


def test_predict_from_fastq_equals_predict_from_fasta(tmp_path, predict_models):
    esm, dna, _, mlp_path = predict_models
    reads = reads_fasta(tmp_path / "reads.fasta", n=12)
    (tmp_path / "fq").mkdir()
    fq = tmp_path / "fq" / "reads.fastq.gz"
    fq.write_bytes(gzip.compress(fastq_text(reads).encode()))
    base = ["--length", "500", "--classifier", str(mlp_path), "--esm-model", str(esm),
            "--dnabert-model", str(dna)]
    _predict([str(tmp_path / "reads.fasta"), *base])
    _predict([str(fq), *base])
    ids, labels, scores = read_predictions(tmp_path / "reads_merged" / "prediction_results.txt")
    fq_ids, fq_labels, fq_scores = read_predictions(tmp_path / "fq" / "reads_merged"
                                                    / "prediction_results.txt")
    assert ids and fq_ids == ids and fq_labels == labels
    assert np.array_equal(fq_scores, scores)
