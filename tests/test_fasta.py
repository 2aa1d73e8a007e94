"""Tests of gpuengine.fasta: reading, normalising and validating FASTA input."""

from __future__ import annotations

import bz2
import gzip
import random
import tracemalloc
from pathlib import Path

import pytest

import gpuengine.fasta as fasta
from gpuengine.errors import InputError, InternalError
from gpuengine.fasta import iter_records, open_text, stream_valid, validate
from gpuengine.records import FastaRecord, RecordProblem

PROTEIN = frozenset("ACDEFGHIKLMNPQRSTVWYXBZUO")


def write(path: Path, text: str | bytes) -> Path:
    """Write ``text`` exactly (no newline translation) and return ``path``."""
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def records(path, alphabet=PROTEIN) -> list[tuple[FastaRecord, RecordProblem | None]]:
    return list(iter_records(path, alphabet=alphabet))


def pairs(path) -> list[tuple[str, str]]:
    return [(r.id, r.sequence) for r, _ in iter_records(path)]


def input_error(fn, *args, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        result = fn(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    return str(info.value)


SIMPLE = ">a first\nMKV\nLLA\n>b\nGG\n"


# ----------------------------------------------------------------------------- opening, formats


def test_plain_file(tmp_path):
    got = records(write(tmp_path / "x.fa", SIMPLE))
    assert [p for _, p in got] == [None, None]
    assert got[0][0] == FastaRecord("a", "MKVLLA", str(tmp_path / "x.fa"), 1, 0)
    assert got[1][0] == FastaRecord("b", "GG", str(tmp_path / "x.fa"), 4, 1)


@pytest.mark.parametrize("name", ["x.fa.gz", "x.fa", "x.txt"])
def test_gzip_detected_by_magic_not_name(tmp_path, name):
    path = write(tmp_path / name, gzip.compress(SIMPLE.encode()))
    assert pairs(path) == [("a", "MKVLLA"), ("b", "GG")]


def test_plain_file_named_gz(tmp_path):
    assert pairs(write(tmp_path / "x.fa.gz", SIMPLE)) == [("a", "MKVLLA"), ("b", "GG")]


def test_multi_member_gzip(tmp_path):
    # Members split mid-record and mid-line, plus an empty member, as BGZF and `cat a.gz b.gz` do.
    data = b"".join(gzip.compress(part) for part in [b">a\nMK", b"", b"V\n>b\n", b"GG\n"])
    assert pairs(write(tmp_path / "x.gz", data)) == [("a", "MKV"), ("b", "GG")]


def test_bgzf(tmp_path):
    from Bio import bgzf

    path = tmp_path / "x.fa.bgz"
    with bgzf.BgzfWriter(str(path), "wb") as handle:
        for i in range(3000):  # more than one 64 KiB block
            handle.write(f">r{i}\n{'ACDEFGHIKLMNPQRSTVWY' * 3}\n".encode())
    got = records(path)
    assert len(got) == 3000 and got[-1][0].id == "r2999" and got[-1][0].line == 5999
    assert all(p is None for _, p in got)


def test_crlf_and_bom(tmp_path):
    path = write(tmp_path / "x.fa", "\ufeff>a desc\r\nMK V\r\nLL\r\n>b\r\nGG\r\n")
    got = records(path)
    assert [(r.id, r.sequence, r.line) for r, _ in got] == [("a", "MKVLL", 1), ("b", "GG", 4)]
    assert all(p is None for _, p in got)


def test_open_text_reads_text(tmp_path):
    with open_text(write(tmp_path / "x", gzip.compress(b">a\r\nM\r\n"))) as fh:
        assert fh.read() == ">a\nM\n"


def test_missing_file(tmp_path):
    msg = input_error(open_text, tmp_path / "nope.fa")
    assert "nope.fa" in msg and "No such file" in msg
    assert "nope.fa" in input_error(iter_records, tmp_path / "nope.fa")
    assert "nope.fa" in input_error(validate, [tmp_path / "nope.fa"], alphabet=None)


def test_directory(tmp_path):
    assert str(tmp_path) in input_error(open_text, tmp_path)


def test_other_compression_named(tmp_path):
    msg = input_error(iter_records, write(tmp_path / "x.fa", bz2.compress(SIMPLE.encode())))
    assert "x.fa" in msg and "bzip2" in msg


# ----------------------------------------------------------------------------- file-level errors


def test_empty_file(tmp_path):
    msg = input_error(iter_records, write(tmp_path / "e.fa", ""))
    assert "e.fa" in msg and "no FASTA records" in msg and "empty" in msg


def test_only_blank_lines(tmp_path):
    msg = input_error(iter_records, write(tmp_path / "b.fa", "\n  \n\t\r\n"))
    assert "b.fa" in msg and "no FASTA records" in msg and "blank" in msg


def test_leading_blank_lines_allowed(tmp_path):
    got = records(write(tmp_path / "x.fa", "\n \n>a\nM\n"))
    assert [(r.id, r.line) for r, _ in got] == [("a", 3)]


def test_not_fasta(tmp_path):
    msg = input_error(iter_records, write(tmp_path / "t.txt", "\n\nhello\n>a\nM\n"))
    assert f"{tmp_path / 't.txt'}:3:" in msg and "not FASTA" in msg and "hello" in msg


def test_binary_file(tmp_path):
    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    msg = input_error(iter_records, write(tmp_path / "img.png", data))
    assert "img.png" in msg and "UTF-8" in msg


def test_undecodable_byte_names_line(tmp_path):
    data = b">a\nMKV\n>b caf\xe9\nGG\n"  # Latin-1, not UTF-8
    msg = input_error(iter_records, write(tmp_path / "l1.fa", data))
    assert f"{tmp_path / 'l1.fa'}:3:7:" in msg and "0xE9" in msg


def test_undecodable_byte_in_gzip_crlf(tmp_path):
    data = gzip.compress(b">a\r\nMKV\r\n\r\n>b\r\nG\xffG\r\n")
    msg = input_error(iter_records, write(tmp_path / "x.gz", data))
    assert f"{tmp_path / 'x.gz'}:5:2:" in msg


def test_truncated_gzip(tmp_path):
    body = "".join(f">r{i}\n{'ACDEFGHIK' * (i % 7 + 1)}\n" for i in range(2000)).encode()
    data = gzip.compress(body)
    msg = input_error(validate, [write(tmp_path / "cut.gz", data[:-len(data) // 3])],
                      alphabet=PROTEIN)
    assert "cut.gz" in msg and "truncated or corrupt gzip" in msg


def test_corrupt_gzip(tmp_path):
    data = bytearray(gzip.compress(SIMPLE.encode() * 50))
    data[-6] ^= 0xFF  # CRC / length trailer
    msg = input_error(iter_records, write(tmp_path / "bad.gz", bytes(data)))
    assert "bad.gz" in msg and "truncated or corrupt gzip" in msg


# ----------------------------------------------------------------------------- ids


def test_unicode_and_long_ids(tmp_path):
    long_id = "Ω" * 300 + "x" * 100  # 700 bytes of UTF-8
    path = write(tmp_path / "x.fa", f">{long_id} d\nM\n>蛋白质|β-2\nK\n")
    assert [r.id for r, _ in records(path)] == [long_id, "蛋白质|β-2"]
    report = validate([path], alphabet=PROTEIN)
    assert report.valid == 2


TRICKY_HEADERS = [
    "plain", "a b c", "a\tb", "a\u00a0b c", "\u00a0lead", "a\u2003b", "x\x1cy", "tail \t ",
    "", " ", " desc only", "\tdesc", "id|with|pipes desc", "ä/ß=é", "a\x0bb", "a\x85b",
]


def test_biopython_id_parity(tmp_path):
    from Bio import SeqIO

    path = write(tmp_path / "x.fa", "".join(f">{h}\nMK\n" for h in TRICKY_HEADERS))
    with open(path, encoding="utf-8") as handle:
        expected = [rec.id for rec in SeqIO.parse(handle, "fasta")]
    assert len(expected) == len(TRICKY_HEADERS)
    assert [r.id for r, _ in records(path)] == expected


@pytest.mark.parametrize("header", ["", "   ", "\t"])
def test_empty_id(tmp_path, header):
    (rec, problem), = records(write(tmp_path / "x.fa", f">{header}\nMK\n"))
    assert problem is not None and problem.kind == "empty-id"
    assert (problem.line, problem.index, problem.record_id) == (1, 0, "")
    assert rec.id == ""


@pytest.mark.parametrize("header", [" desc", "\tdesc", "\u00a0desc"])
def test_whitespace_after_marker_takes_the_first_word_as_biopython(tmp_path, header):
    (rec, problem), = records(write(tmp_path / "x.fa", f">{header}\nMK\n"))
    assert problem is None and rec.id == "desc"


# ----------------------------------------------------------------------------- sequences


def test_lowercase_and_whitespace_removed(tmp_path):
    path = write(tmp_path / "x.fa", ">a\n mk v\t\n\n l\u00a0la\x0b\x0c \n>b\ngg\r\n")
    assert pairs(path) == [("a", "MKVLLA"), ("b", "GG")]
    assert all(p is None for _, p in records(path))


def test_one_trailing_star_stripped(tmp_path):
    path = write(tmp_path / "x.fa", ">a\nMKV*\n>b\nMK\nV*  \n\n")
    assert pairs(path) == [("a", "MKV"), ("b", "MKV")]
    assert all(p is None for _, p in records(path))


@pytest.mark.parametrize(
    "text, line, column",
    [(">a\nMKV**\n", 2, 4), (">a\nMK*V\n", 2, 3), (">a\nMK\n*\n*\n", 3, 1), (">a\n*MK\n", 2, 1)],
)
def test_other_stars_invalid(tmp_path, text, line, column):
    (_, problem), = records(write(tmp_path / "x.fa", text))
    assert problem is not None and problem.kind == "invalid-character"
    assert (problem.character, problem.line, problem.column) == ("*", line, column)


def test_star_allowed_when_no_alphabet(tmp_path):
    (rec, problem), = records(write(tmp_path / "x.fa", ">a\nM*K**\n"), alphabet=None)
    assert (rec.sequence, problem) == ("M*K*", None)


@pytest.mark.parametrize("text", [">a\n>b\nMK\n", ">b\nMK\n>a\n", ">b\nMK\n>a\n \n\t\n", ">a\n*\n>b\nM\n"])
def test_empty_sequence(tmp_path, text):
    got = {r.id: p for r, p in records(write(tmp_path / "x.fa", text))}
    assert got["b"] is None
    assert got["a"] is not None and got["a"].kind == "empty-sequence"


def test_invalid_character_line_and_column(tmp_path):
    text = ">ok\nMKV\n>bad desc\nMKVL\nAA GG\n a\tk\u00a0jA\nJJJ\n>ok2\nM\n"
    got = records(write(tmp_path / "x.fa", text))
    assert [p is None for _, p in got] == [True, False, True]
    problem = got[1][1]
    assert (problem.kind, problem.record_id, problem.index) == ("invalid-character", "bad", 1)
    # 'J' (written 'j') on the record's 3rd line (file line 6) is the first bad character.
    assert (problem.line, problem.column, problem.character) == (6, 6, "J")
    assert "written 'j'" in problem.detail


def test_invalid_character_column_counts_characters(tmp_path):
    alphabet = PROTEIN | {"\u00c9"}  # not ASCII: the slow search path
    text = ">x\nMKV\nAA\nMK \u00e9\u00e9 \t K1A\n"
    (rec, problem), = records(write(tmp_path / "x.fa", text), alphabet=alphabet)
    assert rec.sequence == "MKVAAMK\u00c9\u00c9K1A"
    assert (problem.line, problem.column, problem.character) == (4, 10, "1")


def test_invalid_character_crlf_column(tmp_path):
    (_, problem), = records(write(tmp_path / "x.fa", ">x\r\nMK\r\nA J\r\n"))
    assert (problem.line, problem.column, problem.character) == (3, 3, "J")


# ----------------------------------------------------------------------------- validate


def test_validate_clean(tmp_path):
    a = write(tmp_path / "a.fa", SIMPLE)
    b = write(tmp_path / "b.fa.gz", gzip.compress(b">c\nMMMM\n"))
    report = validate([a, b], alphabet=PROTEIN)
    assert (report.records, report.valid, report.duplicate_records) == (3, 3, 0)
    assert (report.problem_count, report.problems, report.skip) == (0, (), frozenset())
    assert report.residues == 6 + 2 + 4 and report.files == (str(a), str(b))
    assert [r.id for r in stream_valid([a, b], report, alphabet=PROTEIN)] == ["a", "b", "c"]


def test_same_id_same_sequence_is_a_harmless_duplicate(tmp_path):
    a = write(tmp_path / "a.fa", ">x\nMKV\n>y\nGG\n>x other description\nmk\nv\n")
    b = write(tmp_path / "b.fa", ">x\nMKV*\n>z\nA\n")
    report = validate([a, b], alphabet=PROTEIN)
    assert (report.records, report.valid, report.duplicate_records) == (5, 3, 2)
    assert report.problem_count == 0 and report.residues == 3 + 2 + 1
    assert report.skip == {(str(a), 2), (str(b), 0)}
    got = [(r.id, r.path, r.index) for r in stream_valid([a, b], report, alphabet=PROTEIN)]
    assert got == [("x", str(a), 0), ("y", str(a), 1), ("z", str(b), 1)]


def test_conflicting_duplicate_across_files(tmp_path):
    a = write(tmp_path / "a.fa", ">p\nMK\n>x first\nMKV\n>q\nG\n")
    b = write(tmp_path / "b.fa", ">r\nA\n>x second\nMKW\n>x third\nMKV\n")
    with pytest.raises(InputError) as info:
        validate([a, b], alphabet=PROTEIN)
    report = info.value.report
    assert report.problem_count == 2
    second, third = report.problems
    assert (second.kind, second.path, second.line, second.record_id) == (
        "conflicting-duplicate", str(b), 3, "x")
    assert f"{a}:3" in second.detail and "different sequence" in second.detail
    assert (third.path, third.line, third.index) == (str(b), 5, 2)
    assert f"{a}:3" in third.detail and "same sequence" in third.detail
    assert report.skip == {(str(a), 1), (str(b), 1), (str(b), 2)}  # every occurrence
    assert (report.valid, report.duplicate_records, report.residues) == (3, 0, 2 + 1 + 1)
    message = str(info.value)
    assert f"{b}:3: record 'x'" in message and f"first given at {a}:3" in message


def test_conflicting_duplicate_within_one_file(tmp_path):
    path = write(tmp_path / "a.fa", ">x\nMK\n>x\nMKK\n")
    report = validate([path], alphabet=PROTEIN, skip_invalid=True)
    assert [p.kind for p in report.problems] == ["conflicting-duplicate"]
    assert report.valid == 0 and list(stream_valid([path], report, alphabet=PROTEIN)) == []


def test_skip_invalid_and_stream_valid(tmp_path):
    a = write(tmp_path / "a.fa", ">ok1\nMK\n>\nMK\n>bad\nMKJ\n>empty\n>ok2\nGG*\n")
    b = write(tmp_path / "b.fa", ">ok3\nA\n>dup\nM\n>dup\nK\n>ok4\nW\n")
    report = validate([a, b], alphabet=PROTEIN, skip_invalid=True)
    assert report.problem_count == 4 and report.records == 9
    assert sorted(p.kind for p in report.problems) == [
        "conflicting-duplicate", "empty-id", "empty-sequence", "invalid-character"]
    assert report.skip == {(str(a), 1), (str(a), 2), (str(a), 3), (str(b), 1), (str(b), 2)}
    assert report.valid == 4 and report.residues == 2 + 2 + 1 + 1
    got = [r.id for r in stream_valid([a, b], report, alphabet=PROTEIN)]
    assert got == ["ok1", "ok2", "ok3", "ok4"]


def test_error_message_format(tmp_path):
    path = write(tmp_path / "a.fa", ">good\nMK\n>bad1 d\nMK\nAAJ\n")
    with pytest.raises(InputError) as info:
        validate([path], alphabet=PROTEIN)
    message = str(info.value)
    assert f"{path}:5:3: record 'bad1' (#2 in file): invalid-character 'J' (U+004A)" in message
    assert "1 problem in the input FASTA (2 records in 1 file)" in message
    assert message.rstrip().splitlines()[-1].startswith("Fix these records, or rerun with "
                                                          "--skip-invalid")
    assert info.value.report.problem_count == 1


def test_max_problems_cap_and_message_limit(tmp_path):
    path = write(tmp_path / "a.fa", "".join(f">r{i}\nMK{'J' if i % 2 else ''}\n"
                                            for i in range(60)))
    report = validate([path], alphabet=PROTEIN, skip_invalid=True, max_problems=7)
    assert report.problem_count == 30 and len(report.problems) == 7
    assert len(report.skip) == 30 and report.valid == 30
    with pytest.raises(InputError) as info:
        validate([path], alphabet=PROTEIN, max_problems=25)
    lines = str(info.value).splitlines()
    assert sum(line.startswith(f"  {path}:") for line in lines) == 20
    assert "  ... and 10 more" in lines
    assert info.value.report.problem_count == 30 and len(info.value.report.problems) == 25


def test_store_conflicts_are_problems_of_the_record(tmp_path):
    path = write(tmp_path / "a.fa", ">a\nMK\n>b\nGG\n>c\nJ\n")
    seen = []

    class Stored:  # what validation asks of the store (gpuengine.store.lookup.TableLookup)
        def conflict(self, rec: FastaRecord) -> RecordProblem | None:
            seen.append(rec.id)
            if rec.id == "b":
                return RecordProblem("store-conflict", rec.path, rec.line, rec.id, rec.index,
                                     detail="the store holds another sequence for this id")
            return None

    report = validate([path], alphabet=PROTEIN, skip_invalid=True, stored=Stored())
    assert seen == ["a", "b"]  # not asked about the invalid record
    assert [p.kind for p in report.problems] == ["store-conflict", "invalid-character"]
    assert [r.id for r in stream_valid([path], report, alphabet=PROTEIN)] == ["a"]
    message = input_error(validate, [path], alphabet=PROTEIN, stored=Stored())
    assert "store-conflict: the store holds another sequence" in message


def test_hash_collisions_never_give_false_problems(tmp_path, monkeypatch):
    # every id and every sequence gets the same 8-byte hash: each repeat is judged by re-reading
    monkeypatch.setattr(fasta, "_hash_bytes", lambda data: 1)
    a = write(tmp_path / "a.fa", ">a\nMK\n>b\nGG\n>c\nMK\n>a\nMK\n")
    b = write(tmp_path / "b.fa", ">d\nW\n>b\nGA\n")
    report = validate([a, b], alphabet=PROTEIN, skip_invalid=True)
    assert [(p.kind, p.record_id, p.path, p.line) for p in report.problems] == [
        ("conflicting-duplicate", "b", str(b), 3)]
    assert report.duplicate_records == 1
    assert report.skip == {(str(a), 1), (str(a), 3), (str(b), 1)}
    assert [r.id for r in stream_valid([a, b], report, alphabet=PROTEIN)] == ["a", "c", "d"]


def test_small_reread_budget_gives_same_result(tmp_path, monkeypatch):
    text = "".join(f">r{i % 40}\n{'MK' * (i % 40 + 1)}{'W' if i == 77 else ''}\n"
                   for i in range(200))
    path = write(tmp_path / "a.fa", text)
    full = validate([path], alphabet=PROTEIN, skip_invalid=True)
    monkeypatch.setattr(fasta, "_REREAD_BUDGET", 64)
    small = validate([path], alphabet=PROTEIN, skip_invalid=True)
    assert full == small
    assert (full.duplicate_records, full.problem_count, full.valid) == (156, 4, 39)


def test_empty_path_list():
    assert "no input FASTA files" in input_error(validate, [], alphabet=None)


def test_same_path_twice(tmp_path, monkeypatch):
    path = write(tmp_path / "a.fa", SIMPLE)
    msg = input_error(validate, [path, str(path)], alphabet=None)
    assert "given twice" in msg and str(path) in msg
    monkeypatch.chdir(tmp_path)
    assert "given twice" in input_error(validate, ["a.fa", "./a.fa"], alphabet=None)


def test_stream_valid_refuses_other_files(tmp_path):
    a = write(tmp_path / "a.fa", SIMPLE)
    b = write(tmp_path / "b.fa", SIMPLE.replace("a", "c").replace("b", "d"))
    report = validate([a], alphabet=PROTEIN)
    with pytest.raises(InternalError):
        list(stream_valid([b], report, alphabet=PROTEIN))


def test_stream_valid_notices_changed_file(tmp_path):
    path = write(tmp_path / "a.fa", SIMPLE)
    report = validate([path], alphabet=PROTEIN)
    write(path, SIMPLE.replace("GG", "GJ"))
    assert "changed since it was validated" in input_error(
        stream_valid, [path], report, alphabet=PROTEIN)


def test_iter_records_streams(tmp_path):
    path = write(tmp_path / "a.fa", "".join(f">r{i}\nMKVLA\nGG\n" for i in range(12000)))
    assert path.stat().st_size > 180_000
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_records(path, alphabet=PROTEIN))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 12000 and peak < 100_000  # far less than the file


def test_alphabet_may_be_a_plain_set(tmp_path):
    (_, problem), = records(write(tmp_path / "x.fa", ">a\nMKB\n"), alphabet={"M", "K"})
    assert problem is not None and problem.character == "B"


@pytest.mark.parametrize("seed", range(5))
def test_duplicates_match_a_brute_force_reference(tmp_path, seed, monkeypatch):
    rng = random.Random(seed)
    if seed % 2:
        monkeypatch.setattr(fasta, "_REREAD_BUDGET", rng.choice([1, 300, 2000]))
    paths = []
    for number in range(3):
        text = "".join(f">{rng.choice('abcdefgh') * rng.randint(1, 2)} d\n"
                       f"{rng.choice(['MK', 'MKV', 'mk', 'GG*', 'GJ', ''])}\n"
                       for _ in range(rng.randint(1, 40)))
        paths.append(write(tmp_path / f"f{number}.fa", text))
    report = validate(paths, alphabet=PROTEIN, skip_invalid=True)

    by_id: dict[str, list[FastaRecord]] = {}
    skip, bad, conflicts, duplicates = set(), 0, [], 0
    for path in paths:
        for rec, problem in iter_records(path, alphabet=PROTEIN):
            if problem is None:
                by_id.setdefault(rec.id, []).append(rec)
            else:
                bad += 1
                skip.add((rec.path, rec.index))
    for occurrences in by_id.values():
        conflict = len({r.sequence for r in occurrences}) > 1
        skip.update((r.path, r.index) for r in occurrences[0 if conflict else 1:])
        if conflict:
            conflicts += [(r.path, r.line, r.id) for r in occurrences[1:]]
        else:
            duplicates += len(occurrences) - 1
    kept = [r for rs in by_id.values() for r in rs if (r.path, r.index) not in skip]
    assert report.skip == skip and report.duplicate_records == duplicates
    assert report.problem_count == bad + len(conflicts)
    got = [(p.path, p.line, p.record_id) for p in report.problems
           if p.kind == "conflicting-duplicate"]
    if seed % 2:  # several re-read batches: input order within each batch only
        got.sort(key=lambda c: (c[0], c[1]))
    assert got == sorted(conflicts, key=lambda c: (c[0], c[1]))
    assert report.valid == len(kept) and report.residues == sum(len(r.sequence) for r in kept)
    streamed = list(stream_valid(paths, report, alphabet=PROTEIN))
    assert sorted(streamed, key=lambda r: (r.path, r.index)) == streamed
    assert sorted((r.path, r.index) for r in streamed) == sorted((r.path, r.index) for r in kept)
