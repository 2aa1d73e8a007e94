"""VirNucPro's front half: chunking (spec §3) and six-frame translation with frame selection
(spec §4), reproduced exactly, quirks included.

Two implementations of the same thing:

- :func:`chunk_sequence` + :func:`translate_frames_reference`: plain Python, one chunk at a time,
  a line-for-line transcription of the original ``split_fasta_chunk``, ``translate_dna`` and
  ``identify_seq``. It is the spec in code, and it is what the tests compare against.
- :func:`frames_for_batch`: the same result for many reads at once, vectorised with numpy over a
  concatenated byte buffer (a few Python operations per *kept frame*, none per base or codon).

What the original does, and both implementations reproduce:

- Chunking runs on the sequence as given; the chunk is upper-cased before translation, and the
  nucleotide slices returned are cut from the upper-cased chunk (or its reverse complement).
- Codons are looked up in the hard-coded 64-codon standard table. A codon that is not in it
  (N, any other IUPAC letter, a gap, anything) is dropped silently: no ``X``, the frame is kept
  and its protein is just shorter.
- The reverse complement complements A, C, G, T (after upper-casing) and keeps every other
  letter as it is, then reverses.
- Frames F1, F2, F3 read the chunk from offsets 0, 1, 2; R1, R2, R3 read the reverse complement
  from offsets 0, 1, 2; a frame at offset o reads codons at o, o+3, ... while i < len - 2.
- A frame is dropped if its protein contains ``*`` anywhere, or is empty.
- The frame id is the chunk id followed by ``F1`` ... ``R3`` with no separator.
- The nucleotide slice of a kept frame is ``strand[o : o + 3p + 1]`` (clipped at the chunk end),
  p being the protein length *after* dropped codons.

Not reproduced: the original divides by zero on an empty record. Here an empty record yields no
chunk (``chunk_bounds(0, cs) == []``) and ``Frames.chunks_per_read`` is 0 for it, so the caller
can skip and report it. Duplicate read ids are not checked here (the FASTA validator rejects
them).

Non-ASCII sequences (never valid DNA, but possible in a text file) go through the reference
implementation, because ``str.upper`` can change their length; the vectorised path handles the
rest and the results are merged in input order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [
    "CODON_TABLE",
    "FRAME_NAMES",
    "Frames",
    "TranslatedFrame",
    "chunk_bounds",
    "chunk_sequence",
    "frame_records",
    "frames_for_batch",
    "reverse_complement",
    "translate_frames_reference",
    "translate_six_frames",
]

FRAME_NAMES = ("F1", "F2", "F3", "R1", "R2", "R3")

# The original's hard-coded table (units.py ``translate_dna``): the standard genetic code.
CODON_TABLE: dict[str, str] = {
    "TCA": "S", "TCC": "S", "TCG": "S", "TCT": "S", "TTC": "F", "TTT": "F", "TTA": "L", "TTG": "L",
    "TAC": "Y", "TAT": "Y", "TAA": "*", "TAG": "*", "TGC": "C", "TGT": "C", "TGA": "*", "TGG": "W",
    "CTA": "L", "CTC": "L", "CTG": "L", "CTT": "L", "CCA": "P", "CCC": "P", "CCG": "P", "CCT": "P",
    "CAC": "H", "CAT": "H", "CAA": "Q", "CAG": "Q", "CGA": "R", "CGC": "R", "CGG": "R", "CGT": "R",
    "ATA": "I", "ATC": "I", "ATT": "I", "ATG": "M", "ACA": "T", "ACC": "T", "ACG": "T", "ACT": "T",
    "AAC": "N", "AAT": "N", "AAA": "K", "AAG": "K", "AGC": "S", "AGT": "S", "AGA": "R", "AGG": "R",
    "GTA": "V", "GTC": "V", "GTG": "V", "GTT": "V", "GCA": "A", "GCC": "A", "GCG": "A", "GCT": "A",
    "GAC": "D", "GAT": "D", "GAA": "E", "GAG": "E", "GGA": "G", "GGC": "G", "GGG": "G", "GGT": "G",
}

_COMPLEMENT = str.maketrans("ACGTacgt", "TGCAtgca")


# ----------------------------------------------------------------------------- chunking


def chunk_bounds(length: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk of a sequence of ``length``, by the original
    ``split_fasta_chunk`` rule (spec §3), short-last-chunk quirk included.

    n = ceil(L / cs) chunks; R = n*cs - L; q = R // n; u = R - q*(n-1); shifts are u copies of
    q+1, then max(0, n-1-u) copies of q, then 0; chunk k starts at k*cs minus the first k shifts
    and is cs long, clipped at L. ``length == 0`` gives no chunk (the original crashes).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if length < 0:
        raise ValueError(f"length must not be negative, got {length}")
    if length == 0:
        return []
    n = -(-length // chunk_size)
    total_overlap = n * chunk_size - length
    q = total_overlap // n  # the original: int(R / n), the same for 0 <= R < cs
    u = total_overlap - q * (n - 1)
    shifts = [q + 1] * u + [q] * max(0, n - 1 - u) + [0]
    bounds = []
    moved = 0
    for k in range(n):
        start = k * chunk_size - moved
        bounds.append((start, min(start + chunk_size, length)))
        moved += shifts[k]
    return bounds


def chunk_sequence(record_id: str, seq: str, chunk_size: int) -> list[tuple[str, str]]:
    """``[(chunk_id, chunk_seq), ...]`` with ids ``<record_id>_chunk_<k+1>``; the chunks are cut
    from ``seq`` as given (not upper-cased)."""
    return [(f"{record_id}_chunk_{k}", seq[a:b])
            for k, (a, b) in enumerate(chunk_bounds(len(seq), chunk_size), start=1)]


# ----------------------------------------------------------------------------- reference


class TranslatedFrame(NamedTuple):
    frame_id: str
    protein: str
    nucleotide: str


def reverse_complement(seq: str) -> str:
    """Complement A, C, G, T (and a, c, g, t), keep every other letter, reverse."""
    return seq.translate(_COMPLEMENT)[::-1]


def _translate_frame(seq: str, offset: int) -> str:
    return "".join(CODON_TABLE.get(seq[i:i + 3], "") for i in range(offset, len(seq) - 2, 3))


def translate_six_frames(seq: str) -> list[str]:
    """The six proteins F1, F2, F3, R1, R2, R3 of ``seq`` as given (the original
    ``translate_dna``; callers upper-case first)."""
    rc = reverse_complement(seq)
    return [_translate_frame(strand, o) for strand in (seq, rc) for o in range(3)]


def translate_frames_reference(chunk_id: str, chunk_seq: str) -> list[TranslatedFrame]:
    """The kept frames of one chunk, in order F1..R3: the plain per-chunk implementation of
    spec §4 (the original ``process_record`` + ``identify_seq`` in prediction mode)."""
    seq = chunk_seq.upper()
    rc = reverse_complement(seq)
    kept = []
    for f, protein in enumerate(translate_six_frames(seq)):
        if not protein or "*" in protein:
            continue
        strand, offset = (seq, f) if f < 3 else (rc, f - 3)
        kept.append(TranslatedFrame(chunk_id + FRAME_NAMES[f], protein,
                                    strand[offset:offset + 3 * len(protein) + 1]))
    return kept


# ----------------------------------------------------------------------------- vectorised


@dataclass
class Frames:
    """The kept frames of a batch of reads, as parallel columns, in input order: by read, then
    chunk, then frame F1..R3 (the order of the original's ``_identified_*`` files).

    ``chunks_per_read`` has one entry per input read (0 for an empty record, which has no chunk).
    """

    frame_ids: list[str]
    proteins: list[str]
    nucleotides: list[str]
    chunk_ids: list[str]
    read_ids: list[str]
    read_index: np.ndarray  # int64, index of the read in the batch's ``ids``
    chunk_number: np.ndarray  # int32, k in ``_chunk_<k>`` (1-based)
    frame: np.ndarray  # int8, 0..5 for F1, F2, F3, R1, R2, R3
    chunks_per_read: np.ndarray  # int32, one per input read

    def __len__(self) -> int:
        return len(self.frame_ids)

    def __iter__(self):
        """Yield ``TranslatedFrame`` rows (convenience; the columns are the fast interface)."""
        return map(TranslatedFrame, self.frame_ids, self.proteins, self.nucleotides)


# Byte -> base code: A C G T (either case) -> 0..3, every other byte -> 4. Lookups go through
# bytes.translate (a 256-entry table, far faster than numpy fancy indexing).
_BASE5 = bytes("ACGT".index(chr(c).upper()) if chr(c) in "ACGTacgt" else 4 for c in range(256))

_FWD_STOP, _REV_STOP, _DROPPED = 1, 2, 4


def _codon_luts() -> tuple[np.ndarray, bytes]:
    """For a codon index 25*b0 + 5*b1 + b2 (base-5 codes of three consecutive forward bases,
    4 = not ACGT): the amino acid of that codon at [index] and of its reverse complement (the
    codon a reverse frame reads there) at [125 + index], 0 where the codon is dropped; and a
    256-byte flag table: forward stop, reverse stop, dropped (a base is not ACGT)."""
    amino = np.zeros(256, dtype=np.uint8)
    flags = bytearray(256)
    for index in range(125):
        digits = (index // 25, index // 5 % 5, index % 5)
        if 4 in digits:
            flags[index] = _DROPPED
            continue
        codon = "".join("ACGT"[d] for d in digits)
        fwd, rev = CODON_TABLE[codon], CODON_TABLE[reverse_complement(codon)]
        amino[index], amino[125 + index] = ord(fwd), ord(rev)
        flags[index] = (_FWD_STOP if fwd == "*" else 0) | (_REV_STOP if rev == "*" else 0)
    return amino, bytes(flags)


_AMINO, _FLAGS = _codon_luts()
_UPPER = bytes.maketrans(b"abcdefghijklmnopqrstuvwxyz", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_COMP_UPPER = bytes.maketrans(b"ACGT", b"TGCA")
_BLOCK_BASES = 1 << 22  # bases translated per vectorised block: bounds the temporary arrays
_OFFSETS = np.array([0, 1, 2, 0, 1, 2], dtype=np.int64)


def _translate_block(seqs: Sequence[str], lens: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Kept frames of ASCII chunks ``seqs`` (lengths ``lens``, all >= 1): (chunk index in
    ``seqs``, frame 0..5, proteins, nucleotide slices), ordered by chunk then frame."""
    n = len(seqs)
    raw = "".join(seqs).encode("ascii")
    total = len(raw)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])

    # One codon index per position (those straddling two chunks are never read) and its flags.
    codes = np.frombuffer(raw.translate(_BASE5), dtype=np.uint8)
    index = codes[:-2] * 25  # < 125 throughout: stays uint8
    index += codes[1:-1] * 5
    index += codes[2:]
    del codes
    flags = np.frombuffer(index.tobytes().translate(_FLAGS), dtype=np.uint8)

    # Stops and dropped codons are sparse: find them, then their chunk and frames.
    pos = np.flatnonzero(flags)
    flag = flags[pos]
    del flags
    if bool((lens == lens[0]).all()):  # one length for all (fixed-length reads): no search
        chunk = pos // int(lens[0])
    else:
        chunk = np.searchsorted(starts, pos, side="right") - 1
    rel = pos - starts[chunk]
    length = lens[chunk]
    inside = rel <= length - 3  # a whole codon of this chunk starts here
    chunk, rel, length, flag = chunk[inside], rel[inside], length[inside], flag[inside]
    key = chunk * 6
    fwd_key = key + rel % 3
    rev_key = key + 3 + (length - 3 - rel) % 3
    has_stop = np.zeros(6 * n, dtype=bool)
    has_stop[fwd_key[(flag & _FWD_STOP) != 0]] = True
    has_stop[rev_key[(flag & _REV_STOP) != 0]] = True
    is_dropped = (flag & _DROPPED) != 0  # dropped in both strands
    dropped = (np.bincount(fwd_key[is_dropped], minlength=6 * n)
               + np.bincount(rev_key[is_dropped], minlength=6 * n))

    codons = np.maximum(0, (lens[:, None] - _OFFSETS[None, :]) // 3).ravel()  # dropped included
    plen = codons - dropped
    kept = np.flatnonzero(~has_stop & (plen > 0))  # chunk order, then F1..R3
    kept_chunk = kept // 6
    kept_frame = (kept % 6).astype(np.int8)
    if kept.size == 0:
        return kept_chunk, kept_frame, [], []
    kept_codons = codons[kept]
    kept_plen = plen[kept]
    kept_offset = _OFFSETS[kept_frame]
    kept_start = starts[kept_chunk]
    kept_len = lens[kept_chunk]
    reverse = kept_frame >= 3

    # Proteins: gather the kept frames' codon indices (forward frames step +3 from the chunk
    # start + o; reverse frames step -3 from the chunk end - 3 - o, reading the reverse
    # complement's codons in order), look up the amino acid (reverse table at +125) and drop
    # the 0s (codons not in the table).
    first = np.where(reverse, kept_start + kept_len - 3 - kept_offset, kept_start + kept_offset)
    step = np.where(reverse, -3, 3)
    codon_total = int(kept_codons.sum())
    group_start = np.cumsum(kept_codons) - kept_codons
    j = np.arange(codon_total, dtype=np.int64) - np.repeat(group_start, kept_codons)
    gathered = index[np.repeat(first, kept_codons) + np.repeat(step, kept_codons) * j]
    gathered += np.repeat(reverse.astype(np.uint8) * np.uint8(125), kept_codons)
    amino = _AMINO[gathered]
    protein_text = amino[amino != 0].tobytes().decode("ascii")
    ends = np.cumsum(kept_plen).tolist()
    proteins = [protein_text[a:b] for a, b in zip([0] + ends[:-1], ends)]

    # Nucleotide slices: strand[o : min(L, o + 3p + 1)] of the upper-cased chunk or of its reverse
    # complement. The whole buffer, upper-cased, complemented and reversed, holds each chunk's
    # reverse complement at [total - start - L, total - start).
    upper = raw.translate(_UPPER)
    text = (upper + upper.translate(_COMP_UPPER)[::-1]).decode("ascii")
    strand_start = np.where(reverse, 2 * total - kept_start - kept_len, kept_start)
    a = strand_start + kept_offset
    b = strand_start + np.minimum(kept_len, kept_offset + 3 * kept_plen + 1)
    nucleotides = [text[x:y] for x, y in zip(a.tolist(), b.tolist())]
    return kept_chunk, kept_frame, proteins, nucleotides


def _translate_chunks(seqs: Sequence[str], lens: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """:func:`_translate_block` over any number of chunks, in blocks of about ``_BLOCK_BASES``
    bases; non-ASCII chunks go through the reference implementation."""
    chunk_parts: list[np.ndarray] = []
    frame_parts: list[np.ndarray] = []
    proteins: list[str] = []
    nucleotides: list[str] = []

    def add(base: int, result) -> None:
        chunk, frame, prot, nuc = result
        chunk_parts.append(chunk.astype(np.int64) + base)
        frame_parts.append(frame.astype(np.int8))
        proteins.extend(prot)
        nucleotides.extend(nuc)

    n = len(seqs)
    cum = np.cumsum(lens)
    lo = 0
    while lo < n:
        hi = int(np.searchsorted(cum, (cum[lo - 1] if lo else 0) + _BLOCK_BASES, side="right"))
        hi = max(hi, lo + 1)
        block = seqs[lo:hi]
        if "".join(block).isascii():
            add(lo, _translate_block(block, lens[lo:hi]))
        else:
            pos = lo
            for is_ascii, run in itertools.groupby(block, key=str.isascii):
                run = list(run)
                if is_ascii:
                    add(pos, _translate_block(run, lens[pos:pos + len(run)]))
                else:
                    add(pos, _reference_block(run))
                pos += len(run)
        lo = hi
    if not chunk_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int8), [], []
    return np.concatenate(chunk_parts), np.concatenate(frame_parts), proteins, nucleotides


def _reference_block(seqs: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    chunk, frame, proteins, nucleotides = [], [], [], []
    for c, seq in enumerate(seqs):
        for fr in translate_frames_reference("", seq):
            chunk.append(c)
            frame.append(FRAME_NAMES.index(fr.frame_id))
            proteins.append(fr.protein)
            nucleotides.append(fr.nucleotide)
    return (np.asarray(chunk, dtype=np.int64), np.asarray(frame, dtype=np.int8),
            proteins, nucleotides)


def frames_for_batch(ids: Sequence[str], seqs: Sequence[str], chunk_size: int) -> Frames:
    """Chunk every read (spec §3), translate every chunk in six frames and keep the stop-free
    ones (spec §4): the same frames, in the same order, as :func:`chunk_sequence` followed by
    :func:`translate_frames_reference` on each chunk."""
    if len(ids) != len(seqs):
        raise ValueError(f"{len(ids)} ids but {len(seqs)} sequences")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    n_reads = len(seqs)
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=n_reads)
    if n_reads and lens.min() >= 1 and lens.max() <= chunk_size:
        # Short reads (the usual case): one chunk per read, the read itself.
        chunk_seqs = seqs if isinstance(seqs, (list, tuple)) else list(seqs)
        chunk_lens = lens
        chunk_read = None
        chunks_per_read = np.ones(n_reads, dtype=np.int32)
    else:
        chunk_seqs, chunk_lens, reads, numbers = [], [], [], []
        chunks_per_read = np.zeros(n_reads, dtype=np.int32)
        for r, seq in enumerate(seqs):
            length = len(seq)
            bounds = ([(0, length)] if 1 <= length <= chunk_size
                      else chunk_bounds(length, chunk_size))
            chunks_per_read[r] = len(bounds)
            for k, (a, b) in enumerate(bounds, start=1):
                chunk_seqs.append(seq if (a == 0 and b == length) else seq[a:b])
                chunk_lens.append(b - a)
                reads.append(r)
                numbers.append(k)
        chunk_lens = np.asarray(chunk_lens, dtype=np.int64)
        chunk_read = np.asarray(reads, dtype=np.int64)
        chunk_no = np.asarray(numbers, dtype=np.int32)

    chunk, frame, proteins, nucleotides = _translate_chunks(chunk_seqs, chunk_lens)
    read_ids = list(map(ids.__getitem__, chunk.tolist() if chunk_read is None
                        else chunk_read[chunk].tolist()))
    if chunk_read is None:
        read_index = chunk
        chunk_number = np.ones(len(chunk), dtype=np.int32)
        chunk_ids = [rid + "_chunk_1" for rid in read_ids]
    else:
        read_index = chunk_read[chunk]
        chunk_number = chunk_no[chunk]
        chunk_ids = [f"{rid}_chunk_{k}" for rid, k in zip(read_ids, chunk_number.tolist())]
    return Frames(
        frame_ids=list(map(str.__add__, chunk_ids, map(FRAME_NAMES.__getitem__, frame.tolist()))),
        proteins=proteins,
        nucleotides=nucleotides,
        chunk_ids=chunk_ids,
        read_ids=read_ids,
        read_index=read_index,
        chunk_number=chunk_number,
        frame=frame,
        chunks_per_read=chunks_per_read,
    )


def frame_records(ids: Sequence[str], seqs: Sequence[str], *, length: int, column: str,
                  shard: Sequence[int] | None = None) -> tuple[list[str], list[str]]:
    """What ``predict`` embeds of a block of reads: the kept frames' ids and their
    ``column`` (``"nucleotides"`` or ``"proteins"``), in :func:`frames_for_batch`'s order.
    ``shard`` ``(I, N)``: only the reads of shard I of N (by the read's sequence digest,
    :meth:`gpuengine.shards.Shard.holds_sequence`). An input process calls this on each block
    it reads (a :class:`gpuengine.inputs.Derivation` names it), so the frames are made where
    the reads are parsed, not in the engine's process."""
    if column not in ("nucleotides", "proteins"):
        raise ValueError(f"column must be 'nucleotides' or 'proteins', not {column!r}")
    if shard is not None:
        from gpuengine.shards import Shard

        keep = Shard(*shard).holds_sequence
        kept = [i for i, seq in enumerate(seqs) if keep(seq)]
        ids, seqs = [ids[i] for i in kept], [seqs[i] for i in kept]
    frames = frames_for_batch(ids, seqs, length)
    return frames.frame_ids, getattr(frames, column)
