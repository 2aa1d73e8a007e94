"""VirNucPro chunking and six-frame translation: hand-worked cases from the spec (§3, §4) and
the vectorised batch path against the plain per-chunk reference."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gpuengine.workflows.virnucpro import frames as frames_module
from gpuengine.workflows.virnucpro.frames import (
    CODON_TABLE,
    FRAME_NAMES,
    TranslatedFrame,
    chunk_bounds,
    chunk_sequence,
    frames_for_batch,
    reverse_complement,
    translate_frames_reference,
)

# ----------------------------------------------------------------------------- chunking

CHUNK_CASES = [  # (L, cs, [start, end) of every chunk), worked by hand from spec §3
    (150, 500, [(0, 150)]),
    (300, 500, [(0, 300)]),
    (500, 500, [(0, 500)]),
    (501, 500, [(0, 500), (250, 501)]),  # R=499 q=249 u=250>1: shift 250, last 251
    (600, 500, [(0, 500), (299, 600)]),  # R=400 q=200 u=200>1: shift 201, last 301
    (750, 500, [(0, 500), (374, 750)]),  # last 376
    (999, 500, [(0, 500), (499, 999)]),  # R=1 q=0 u=1<=1: shift 1, exact end
    (1000, 500, [(0, 500), (500, 1000)]),  # exact tiling
    (1001, 500, [(0, 500), (333, 833), (666, 1001)]),  # R=499 q=166 u=167>2: last 335
    (1498, 500, [(0, 500), (499, 999), (998, 1498)]),  # R=2 q=0 u=2<=2
    (1500, 500, [(0, 500), (500, 1000), (1000, 1500)]),  # R=0
    (2600, 500, [(0, 500), (433, 933), (866, 1366), (1299, 1799), (1732, 2232),
                 (2165, 2600)]),  # R=400 q=66 u=70>5: shifts 67, last 435
    (601, 300, [(0, 300), (200, 500), (400, 601)]),  # R=299 q=99 u=101>2: last 201
    (1000, 300, [(0, 300), (249, 549), (498, 798), (747, 1000)]),  # R=200 q=50 u=50>3: last 253
    (1, 500, [(0, 1)]),
]


@pytest.mark.parametrize("length,cs,expected", CHUNK_CASES)
def test_chunk_bounds_golden(length, cs, expected):
    assert chunk_bounds(length, cs) == expected


def test_chunk_sequence_ids_and_content():
    seq = "".join(random.Random(0).choice("ACGTacgtN") for _ in range(1001))
    chunks = chunk_sequence("contig 7", seq, 500)  # the id is used as given
    assert [c for c, _ in chunks] == ["contig 7_chunk_1", "contig 7_chunk_2", "contig 7_chunk_3"]
    assert [s for _, s in chunks] == [seq[0:500], seq[333:833], seq[666:1001]]  # not upper-cased
    assert chunk_sequence("r", "acgT", 500) == [("r_chunk_1", "acgT")]  # no padding
    assert chunk_sequence("r", "", 500) == []  # the original divides by zero here


def test_chunk_bounds_cover_and_short_last_chunk_rate():
    for cs in (300, 500):
        short = 0
        for length in range(1, 20_001):
            bounds = chunk_bounds(length, cs)
            assert len(bounds) == -(-length // cs)
            assert bounds[0][0] == 0 and bounds[-1][1] == length
            assert all(b - a == cs for a, b in bounds[:-1])
            assert all(0 <= nxt[0] <= cur[1] for cur, nxt in zip(bounds, bounds[1:]))
            short += length > cs and bounds[-1][1] - bounds[-1][0] < cs
        # spec §3: for L from cs+1 to 20,000, 55 % (cs=500) and 27 % (cs=300) have a short last
        assert round(100 * short / (20_000 - cs)) == {500: 55, 300: 27}[cs]


def test_chunk_bounds_rejects_bad_arguments():
    with pytest.raises(ValueError):
        chunk_bounds(10, 0)
    with pytest.raises(ValueError):
        chunk_bounds(-1, 500)


# ----------------------------------------------------------------------------- translation


def test_codon_table_is_the_standard_code():
    assert len(CODON_TABLE) == 64
    assert sorted(k for k, v in CODON_TABLE.items() if v == "*") == ["TAA", "TAG", "TGA"]
    assert CODON_TABLE["ATG"] == "M" and CODON_TABLE["TGG"] == "W"
    assert "".join(sorted(set(CODON_TABLE.values()) - {"*"})) == "ACDEFGHIKLMNPQRSTVWY"


def test_reverse_complement_keeps_other_letters():
    assert reverse_complement("ACGTacgtNRYn-") == "-nYRNacgtACGT"


def F(frame_id, protein, nucleotide):  # short, for the tables below
    return TranslatedFrame(frame_id, protein, nucleotide)


def test_every_frame_by_hand():
    # No T in the read: no stop in any frame (a reverse stop needs TTA/CTA/TCA forward).
    # revcomp("GCAAGCGAACCAGGG") = "CCCTGGTTCGCTTGC"
    assert translate_frames_reference("r_chunk_1", "GCAAGCGAACCAGGG") == [
        F("r_chunk_1F1", "ASEPG", "GCAAGCGAACCAGGG"),  # GCA AGC GAA CCA GGG, 3p+1=16 -> clipped
        F("r_chunk_1F2", "QANQ", "CAAGCGAACCAGG"),  # CAA GCG AAC CAG; [1:14]
        F("r_chunk_1F3", "KRTR", "AAGCGAACCAGGG"),  # AAG CGA ACC AGG; [2:15]
        F("r_chunk_1R1", "PWFAC", "CCCTGGTTCGCTTGC"),  # CCC TGG TTC GCT TGC
        F("r_chunk_1R2", "PGSL", "CCTGGTTCGCTTG"),  # CCT GGT TCG CTT
        F("r_chunk_1R3", "LVRL", "CTGGTTCGCTTGC"),  # CTG GTT CGC TTG
    ]


def test_lowercase_is_upper_cased_first():
    assert translate_frames_reference("r", "gcaagcgaaccaggg") == \
        translate_frames_reference("r", "GCAAGCGAACCAGGG")
    assert translate_frames_reference("r", "gcaNgcgaaccaggg") == \
        translate_frames_reference("r", "GCANGCGAACCAGGG")


@pytest.mark.parametrize("letter", ["N", "R", "Y", "K", "n"])
def test_ambiguous_codons_are_dropped_and_frames_kept(letter):
    seq = "GCA" + letter + "GCGAACCAGGG"
    up = letter.upper()
    # revcomp keeps the letter as it is: "CCCTGGTTCGC" + up + "TGC"
    assert translate_frames_reference("r", seq) == [
        F("rF1", "AEPG", f"GCA{up}GCGAACCAG"),  # GCA [{up}GC] GAA CCA GGG: p=4 -> [0:13]
        F("rF2", "ANQ", f"CA{up}GCGAACC"),  # [CA{up}] GCG AAC CAG: p=3 -> [1:11]
        F("rF3", "RTR", f"A{up}GCGAACCA"),  # [A{up}G] CGA ACC AGG: p=3 -> [2:12]
        F("rR1", "PWFC", f"CCCTGGTTCGC{up}T"),  # CCC TGG TTC [GC{up}] TGC: p=4 -> [0:13]
        F("rR2", "PGS", "CCTGGTTCGC"),  # CCT GGT TCG [C{up}T]: p=3 -> [1:11]
        F("rR3", "LVR", f"CTGGTTCGC{up}"),  # CTG GTT CGC [{up}TG]: p=3 -> [2:12]
    ]


def test_stop_anywhere_drops_the_frame():
    # ATG TAA (F1 has a stop); revcomp "TTACAT"
    assert translate_frames_reference("r", "ATGTAA") == [
        F("rF2", "C", "TGTA"), F("rF3", "V", "GTAA"),
        F("rR1", "LH", "TTACAT"), F("rR2", "Y", "TACA"), F("rR3", "T", "ACAT")]


@pytest.mark.parametrize("seq", ["TTAATTAATTAA", "", "A", "AC", "NNNNNN", "acNNNNNNt"])
def test_reads_without_a_kept_frame(seq):
    # TTAATTAATTAA is its own reverse complement; TAA at 1, 5, 9 stops F2, F3, F1.
    assert translate_frames_reference("r", seq) == []


def test_500bp_chunk_slices():
    kept = translate_frames_reference("c", "C" * 500)  # CCC=P forward, GGG=G reverse
    assert [f.frame_id for f in kept] == ["c" + name for name in FRAME_NAMES]
    assert [f.protein for f in kept] == ["P" * 166] * 3 + ["G" * 166] * 3
    assert [len(f.nucleotide) for f in kept] == [499, 499, 498] * 2


def test_174bp_read_r2_slice():
    rc = "A" + "GCT" * 57 + "AA"
    read = "TT" + "AGC" * 57 + "T"
    assert reverse_complement(read) == rc and len(read) == 174
    assert translate_frames_reference("x", read) == [
        F("xF1", "L" + "A" * 57, read),  # TTA GCA ... GCT: p=58, 175 clipped to 174
        # F2 starts TAG: dropped
        F("xF3", "S" * 57, "AGC" * 57 + "T"),
        # R1 ends TAA: dropped
        F("xR2", "A" * 57, "GCT" * 57 + "A"),  # p=57: 172 nt, one beyond the last codon
        F("xR3", "L" * 57, rc[2:]),
    ]


# ----------------------------------------------------------------------------- vectorised


def reference_batch(ids, seqs, cs):
    rows = []
    for r, (rid, seq) in enumerate(zip(ids, seqs)):
        for k, (cid, cseq) in enumerate(chunk_sequence(rid, seq, cs), start=1):
            for fr in translate_frames_reference(cid, cseq):
                rows.append((fr, cid, rid, r, k, FRAME_NAMES.index(fr.frame_id[-2:])))
    return rows


def batch_rows(fr):
    assert len({len(fr.frame_ids), len(fr.proteins), len(fr.nucleotides), len(fr.chunk_ids),
                len(fr.read_ids), len(fr.read_index), len(fr.chunk_number), len(fr.frame)}) == 1
    return [(TranslatedFrame(*t), c, r, i, k, f) for t, c, r, i, k, f in zip(
        zip(fr.frame_ids, fr.proteins, fr.nucleotides), fr.chunk_ids, fr.read_ids,
        fr.read_index.tolist(), fr.chunk_number.tolist(), fr.frame.tolist())]


def random_reads(n, seed, lengths=None, alphabet="ACGT" * 12 + "acgtNnRYKMSWBDHVnX-."):
    rng = random.Random(seed)
    ids, seqs = [], []
    for i in range(n):
        length = lengths(rng) if lengths else rng.choice(
            [0, 1, 2, 3, 4, 5, 6, 7, rng.randint(8, 160), rng.randint(8, 160),
             rng.randint(150, 520), rng.randint(500, 2700)])
        ids.append(f"read{i}.{rng.randint(0, 9)}")
        seqs.append("".join(rng.choice(alphabet) for _ in range(length)))
    return ids, seqs


@pytest.mark.parametrize("cs", [300, 500])
def test_batch_equals_reference_on_random_reads(cs):
    ids, seqs = random_reads(3000, seed=cs)
    fr = frames_for_batch(ids, seqs, cs)
    assert batch_rows(fr) == reference_batch(ids, seqs, cs)
    assert fr.chunks_per_read.tolist() == [len(chunk_bounds(len(s), cs)) for s in seqs]
    assert len(fr) > 1000


def test_batch_equals_reference_for_fixed_length_short_reads():
    # One chunk per read, all of one length: the fast path (no chunking loop, no search).
    ids, seqs = random_reads(4000, seed=1, lengths=lambda rng: 150,
                             alphabet="ACGT" * 30 + "acgtN")
    fr = frames_for_batch(ids, seqs, 500)
    assert batch_rows(fr) == reference_batch(ids, seqs, 500)
    assert (fr.chunks_per_read == 1).all() and (fr.chunk_number == 1).all()
    assert fr.frame.dtype == np.int8 and len(fr) > 1000


def test_batch_across_small_blocks_and_non_ascii(monkeypatch):
    monkeypatch.setattr(frames_module, "_BLOCK_BASES", 1000)
    ids, seqs = random_reads(600, seed=9)
    # Non-ASCII letters go through the reference (str.upper may change their length).
    seqs[3] = "GCAAGCéGAACCAGGG"
    seqs[4] = "ﬃACGTGCAGCAAGCAGC" * 3
    seqs[10] = "GCAAGCGAACCAGGGß" * 40
    fr = frames_for_batch(ids, seqs, 300)
    assert batch_rows(fr) == reference_batch(ids, seqs, 300)


def test_batch_edge_cases():
    empty = frames_for_batch([], [], 500)
    assert len(empty) == 0 and empty.chunks_per_read.shape == (0,)
    fr = frames_for_batch(["a", "b", "c"], ["", "AC", "TTAATTAATTAA"], 500)
    assert len(fr) == 0 and fr.chunks_per_read.tolist() == [0, 1, 1]
    fr = frames_for_batch(("x", "y"), ("ATGTAA", "gcaagcgaaccaggg"), 500)
    assert fr.frame_ids == ["x_chunk_1F2", "x_chunk_1F3", "x_chunk_1R1", "x_chunk_1R2",
                            "x_chunk_1R3"] + [f"y_chunk_1{n}" for n in FRAME_NAMES]
    assert fr.read_ids == ["x"] * 5 + ["y"] * 6 and fr.read_index.tolist() == [0] * 5 + [1] * 6
    assert fr.nucleotides[5] == "GCAAGCGAACCAGGG"  # upper-cased
    assert list(fr)[0] == F("x_chunk_1F2", "C", "TGTA")
    with pytest.raises(ValueError):
        frames_for_batch(["a"], [], 500)
    with pytest.raises(ValueError):
        frames_for_batch(["a"], ["ACGT"], 0)


def test_long_read_chunks_in_batch():
    seq = ("GCAAGCGAACCAGGG" * 70)[:1001]  # no T: every frame of every chunk is kept
    fr = frames_for_batch(["long", "short"], [seq, "C" * 500], 500)
    assert fr.chunks_per_read.tolist() == [3, 1]
    assert fr.chunk_ids == ([f"long_chunk_{k}" for k in (1, 2, 3) for _ in range(6)]
                            + ["short_chunk_1"] * 6)
    assert fr.chunk_number.tolist() == [1] * 6 + [2] * 6 + [3] * 6 + [1] * 6
    last = [n for c, n in zip(fr.chunk_ids, fr.nucleotides) if c == "long_chunk_3"]
    assert last[0] == seq[666:1000]  # the 335-bp short last chunk; F1: p=111, 3p+1 = 334
    assert [len(n) for n in last] == [334, 334, 333] * 2
