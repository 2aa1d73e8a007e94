"""The second pass's record-aligned blocks (``gpuengine.blocks``): cut anywhere, in any block
size, they hold every record of the file exactly once, and parsed they give the ids and
sequences the first pass (``fasta.iter_records``) reads, with its problem positions."""

from __future__ import annotations

import gzip
import random

import pytest

from gpuengine.blocks import parse_block, read_blocks
from gpuengine.errors import InputError
from gpuengine.fasta import iter_records
from gpuengine.tokenization import ESM_RESIDUES

AA = "ACDEFGHIKLMNPQRSTVWY"


def _fasta_text(rng: random.Random, n: int, *, newline: str, final_newline: bool) -> str:
    out = ["\n\n"] if rng.random() < 0.5 else []  # blank lines before the first record
    for i in range(n):
        seq = "".join(rng.choice(AA) for _ in range(rng.randint(1, 130)))
        if rng.random() < 0.1:
            seq = seq.lower() + "*"
        header = f">r{i}" + (" some description" if i % 3 else "")
        if i % 11 == 5:
            header = f">  r{i} starts with spaces"  # id after the whitespace
        if i % 17 == 3:
            seq = seq[:2] + "J" + seq[2:]  # not in the alphabet
        if i % 19 == 4:
            header = f">ün{i}\u00a0x"  # non-ASCII id with a no-break space (str whitespace)
        width = rng.choice([10, 60, 1000])
        lines = [seq[k:k + width] for k in range(0, len(seq), width)]
        if i % 7 == 2:
            lines.append("")  # a blank line inside the record
        out.append("\n".join([header, *lines]) + "\n")
    text = "".join(out)
    if not final_newline:
        text = text.rstrip("\n")
    return text.replace("\n", newline)


def _fastq_text(rng: random.Random, n: int, *, newline: str, final_newline: bool) -> str:
    out = []
    for i in range(n):
        seq = "".join(rng.choice("ACGTN") for _ in range(rng.randint(1, 160)))
        if i % 13 == 6:
            seq = seq[:3] + "U" + seq[3:]
        qual = "".join(rng.choice("!#5?I@+") for _ in seq)  # '@' and '+' start quality lines
        plus = f"+read{i} lane=1" if i % 2 else "+"
        out.append(f"@read{i} lane=1\n{seq}\n{plus}\n{qual}\n")
    text = "".join(out) + ("\n \n" if rng.random() < 0.5 else "")
    if not final_newline:
        text = text.rstrip("\n")
    return text.replace("\n", newline)


def _first_pass(path, alphabet):
    records, skip = [], []
    for rec, problem in iter_records(path, alphabet=alphabet):
        if problem is None:
            records.append((rec.id, rec.sequence))
        else:
            skip.append(rec.index)
    return records, skip


def _second_pass(path, alphabet, skip, block_bytes):
    got, expected_index, expected_line = [], 0, None
    for block in read_blocks(path, 0, block_bytes):
        assert block.first_index == expected_index  # contiguous: nothing skipped or repeated
        expected_index += block.count
        if expected_line is not None:
            assert block.first_line == expected_line
        expected_line = block.first_line + block.data.count(b"\n")
        inside = [i for i in skip if block.first_index <= i < block.first_index + block.count]
        ids, seqs = parse_block(block, str(path), alphabet, inside)
        assert len(ids) == block.count - len(inside)
        got.extend(zip(ids, (s.decode() for s in seqs)))
    return got


@pytest.mark.parametrize("fmt", ["fasta", "fastq"])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("final_newline", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_blocks_hold_every_record_once_whatever_the_cut(tmp_path, fmt, newline, final_newline,
                                                        packed):
    rng = random.Random(hash((fmt, newline, final_newline)) & 0xFFFF)
    make = _fasta_text if fmt == "fasta" else _fastq_text
    text = make(rng, 120, newline=newline, final_newline=final_newline)
    raw = ("\ufeff" if fmt == "fasta" else "") .encode() + text.encode("utf-8")
    path = tmp_path / ("in.gz" if packed else "in.txt")
    path.write_bytes(gzip.compress(raw) if packed else raw)
    alphabet = ESM_RESIDUES if fmt == "fasta" else frozenset("ACGTN")
    expected, skip = _first_pass(path, alphabet)
    assert skip and len(expected) > 60
    for block_bytes in (1, 2, 3, 7, 64, 500, 1 << 19):
        assert _second_pass(path, alphabet, skip, block_bytes) == expected, block_bytes


def test_a_record_that_changed_is_reported_where_the_first_pass_would(tmp_path):
    path = tmp_path / "p.fa"
    path.write_text(">a\nMKV\n>b desc\nMK\nVJ\n>c\nMM\n")
    for block_bytes in (1, 5, 1 << 19):
        with pytest.raises(InputError, match=r"p.fa changed since it was validated: .*p.fa:5:2: "
                                             r"record 'b' \(#2 in file\): invalid-character 'J'"):
            for block in read_blocks(path, 0, block_bytes):
                parse_block(block, str(path), ESM_RESIDUES)


@pytest.mark.parametrize("text, where", [
    ("@a\nACGT\n+\nIIII\n@b\nACGT\n-\nIIII\n", ":7:1: FASTQ record 'b' (#2 in file): expected "
                                             "the '+' separator line"),
    ("@a\nACGT\n+\nIII\n", ":4:4: FASTQ record 'a' (#1 in file): the quality line has 3"),
    ("@a\nACGT\n+b\nIIII\n", ":3:2: FASTQ record 'a' (#1 in file): the '+' line repeats"),
])
def test_a_malformed_fastq_record_is_reported_with_its_position(tmp_path, text, where):
    path = tmp_path / "r.fq"
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        for block in read_blocks(path):
            parse_block(block, str(path), None)
    assert f"changed since it was validated: {path}{where}" in str(caught.value)


@pytest.mark.parametrize("seed", range(5))
def test_counts_of_a_block_are_the_byte_counts(seed):
    """``_count``'s one numpy pass counts what ``bytes.count`` counts: records (FASTA: a '>'
    after a newline, also in descriptions that hold '>'; FASTQ: a quarter of the lines) and
    lines."""
    from gpuengine.blocks import _count

    rng = random.Random(seed)
    records = [f">r{i}{rng.choice(['', ' a>b', ' >x', '>'])}\n"
               + "\n".join("ACGT>"[:rng.randrange(1, 5)] * rng.randrange(1, 9)
                           for _ in range(rng.randrange(1, 4))) + "\n"
               for i in range(rng.randrange(1, 300))]
    fasta = "".join(records).encode()
    assert _count(fasta, "fasta") == (fasta.count(b"\n>") + 1, fasta.count(b"\n"))
    fastq = "".join(f"@q{i}\nACGT\n+\nIIII\n" for i in range(rng.randrange(1, 200))).encode()
    assert _count(fastq, "fastq") == (fastq.count(b"\n") // 4, fastq.count(b"\n"))
    assert _count(b">a\nAC\n", "fasta") == (1, 2)
