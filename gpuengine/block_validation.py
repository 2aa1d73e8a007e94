"""The validation first pass over one FASTA or FASTQ file, read as record-aligned blocks.

:func:`gpuengine.fasta.validate` reads every record once to find the bad ones and to hash the
rest. Line by line in Python that is about 4 µs a 150-bp read (one core); here a file is read
as :func:`gpuengine.blocks.read_blocks` blocks and each block is split, normalised, checked
and hashed with a few C-level calls per record, as :func:`gpuengine.blocks.parse_block` does
for the second pass.

What it finds is what the line-by-line pass finds, record for record (a FASTQ block is taken only when every record in it is sound,
as :func:`gpuengine.fastq.check_record` checks): a record the quick
check does not pass (an empty id or sequence, a header starting with whitespace or holding
anything but printable ASCII, spaces and tabs, a sequence not ASCII or with a character
outside the alphabet) is made the line-by-line pass's own way
(:func:`gpuengine.fasta.make_record`), so its id, sequence and problem (line, column) are
the same. A file this pass does not take on (a malformed FASTQ record, bytes not UTF-8, a
read error, a truncated gzip file) is left to the line-by-line pass, which gives its exact error: this
pass then reports ``None`` and has changed nothing.
"""

from __future__ import annotations

import os
import zlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from gpuengine.blocks import _WHITESPACE, BLOCK_BYTES, Block, _fasta_parts, read_blocks
from gpuengine import fasta
from gpuengine.errors import InputError, InternalError
from gpuengine.fasta import (_compile_alphabet, _first_line, _name, make_record, open_text,
                             StoredRecords)
from gpuengine.records import FastaRecord, RecordProblem

if TYPE_CHECKING:
    from gpuengine.validation_workers import SharedPass

__all__ = ["FileTally", "first_pass_blocks", "take_block"]

_PLAIN_HEADER = bytes(range(0x21, 0x7F)) + b" \t"
"""Header bytes whose meaning is the same read as bytes or as text (``str.split`` also splits
at ``\\x1c``-``\\x1f``, ``bytes.split`` does not; a non-ASCII byte may be whitespace)."""
_ID_BYTES = bytes(range(0x21, 0x7F)) + b"\n"
"""What a block's headers (joined by newlines) may hold for the quick way: ids alone."""


@dataclass
class FileTally:
    """What the first pass found in one file: per hashed (otherwise valid) record, in input
    order, its id and sequence hashes (8 bytes each), its index in the file, its residues and
    whether ``select`` took it; the index of every record with a problem and the first
    ``max_problems`` problems, in record order."""

    records: int = 0
    residues: int = 0
    id_hashes: bytearray = field(default_factory=bytearray)
    seq_hashes: bytearray = field(default_factory=bytearray)
    indices: array = field(default_factory=lambda: array("Q"))
    lengths: array = field(default_factory=lambda: array("I"))
    selected: bytearray = field(default_factory=bytearray)
    problems: list[RecordProblem] = field(default_factory=list)
    skipped: array = field(default_factory=lambda: array("Q"))
    max_problems: int = 1000
    stable: bool = False
    """The hashes are :func:`gpuengine.fasta._hashes`' stable ones."""

    def add(self, part: FileTally) -> None:
        """Add the tally of the file's next block(s) (its records follow this one's)."""
        if part.stable != self.stable:
            raise InternalError("first-pass tallies of two kinds of hashes")
        self.records += part.records
        self.residues += part.residues
        self.id_hashes += part.id_hashes
        self.seq_hashes += part.seq_hashes
        self.indices += part.indices
        self.lengths += part.lengths
        self.selected += part.selected
        self.skipped += part.skipped
        room = self.max_problems - len(self.problems)
        self.problems += part.problems[:max(0, room)]


def first_pass_blocks(path: str | os.PathLike, number: int, alphabet: frozenset[str] | None,
                      stored: StoredRecords | None,
                      select: Callable[[str], bool] | None = None,
                      max_problems: int = 1000, shared: SharedPass | None = None,
                      stable: bool = False) -> FileTally | None:
    """The first pass over FASTA or FASTQ file ``path`` (input number ``number``), or None
    when the file is one to read line by line (see the module docstring); its first
    ``max_problems`` problems are kept (all are counted). A large file's blocks are taken by
    child processes as ``shared`` allows (:mod:`gpuengine.validation_workers`; same tally),
    which hash ``stable`` (:func:`gpuengine.fasta._hashes`), as the whole pass then must.

    Raises:
        InputError: as :func:`gpuengine.fasta.iter_records` for a file whose first non-blank
            line is not a header, or that holds no records.
    """
    name = _name(path)
    with open_text(path) as fh:  # the line-by-line pass's own errors for the file's start
        _first_line(path, name, fh)
    from gpuengine import validation_workers

    if stable and validation_workers.takes_on(path, shared, select):
        return validation_workers.tally_in_processes(path, number, name, alphabet, stored,
                                                     select, max_problems, shared.count,
                                                     shared.block_bytes or BLOCK_BYTES)
    fast = None if alphabet is None else _compile_alphabet(alphabet)[1]
    tally = FileTally(max_problems=max_problems, stable=stable)
    try:
        for block in read_blocks(path, number, BLOCK_BYTES):
            if not take_block(block, name, alphabet, fast, stored, select, tally):
                return None
    except (InputError, OSError, EOFError, zlib.error):
        return None  # read again line by line, which names the place
    return tally


def take_block(block: Block, name: str, alphabet: frozenset[str] | None, fast: bytes | None,
               stored: StoredRecords | None, select: Callable[[str], bool] | None,
               tally: FileTally, valid_ids: list[bytes] | None = None) -> bool:
    """Add one block's records to ``tally`` (and the ids of its valid records to
    ``valid_ids``); False (``tally`` unchanged) when the block must be read
    line by line."""
    data = block.data
    if not data.isascii():
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return False
    n = block.count
    simple = None if fast is None or block.fmt != "fasta" else _simple_records(data, n, fast)
    if simple is not None:
        ids, seqs = simple
        problems: dict[int, RecordProblem] = {}
        valid = range(n)
    else:
        found = _records(block, name, alphabet, fast)
        if found is None:
            return False
        ids, seqs, problems = found
        valid = [i for i in range(n) if i not in problems] if problems else range(n)
    if stored is not None:
        _store_conflicts(block, name, stored, ids, seqs, valid, problems)
        if problems:
            valid = [i for i in valid if i not in problems]
    if len(valid) != n:
        ids = [ids[i] for i in valid]
        seqs = [seqs[i] for i in valid]
    if valid_ids is not None:
        valid_ids += ids
    tally.id_hashes += fasta._hashes(ids, tally.stable)
    tally.seq_hashes += fasta._hashes(seqs, tally.stable)
    first = block.first_index
    tally.indices.frombytes((np.asarray(valid, dtype=np.uint64) + np.uint64(first)).tobytes())
    lengths = array("I", map(len, seqs))
    tally.lengths += lengths
    tally.residues += sum(lengths)
    if select is not None:
        tally.selected += bytes(select(s.decode()) for s in seqs)
    if problems:
        order = sorted(problems)
        tally.skipped.extend(first + i for i in order)
        room = tally.max_problems - len(tally.problems)
        tally.problems += [problems[i] for i in order[:max(0, room)]]
    tally.records += n
    return True


def _simple_records(data: bytes, n: int, fast: bytes) -> tuple[list[bytes], list[bytes]] | None:
    """The ids and sequences of a block whose every record is one header line of printable
    ASCII without whitespace and one line of sequence in the alphabet (upper-cased: ``fast``
    the alphabet's bytes), with no ``*``, told and split with a few calls on the whole block;
    None for any other block."""
    lines = data.split(b"\n")
    if len(lines) != 2 * n + 1:
        return None
    heads = b"\n".join(lines[0:2 * n:2])
    body = b"\n".join(lines[1::2]).upper()
    if (body.startswith((b">", b"\n")) or b"\n>" in body or b"*" in body or b"\n\n" in body
            or not body or body.endswith(b"\n")
            or body.translate(None, fast + b"\n") or heads.translate(None, _ID_BYTES)):
        return None
    ids = heads[1:].split(b"\n>")
    seqs = body.split(b"\n")
    if len(ids) != n or len(seqs) != n or not all(ids):
        return None
    return ids, seqs


def _records(block: Block, name: str, alphabet: frozenset[str] | None, fast: bytes | None
             ) -> tuple[list[bytes], list[bytes], dict[int, RecordProblem]] | None:
    """The ids and sequences (as bytes) of any FASTA block's records and the problems found
    (record ``i`` of the block: ``problems[i]``); None when the block must be read line by
    line."""
    data = block.data
    parts = _fasta_parts(data) if block.fmt == "fasta" else _fastq_parts(data)
    if parts is None or len(parts[0]) != block.count:
        return None
    headers, bodies = parts
    n = len(headers)
    seqs = [b.translate(None, _WHITESPACE).upper() for b in bodies]
    if b"*" in data:
        seqs = [s[:-1] if s[-1:] == b"*" else s for s in seqs]
    words = [h.split(None, 1) for h in headers]
    if alphabet is not None and fast is None:
        slow = list(range(n))
    else:
        slow = [i for i, (w, h, s) in enumerate(zip(words, headers, seqs))
                if not w or not s or h[:1] in b" \t" or h.translate(None, _PLAIN_HEADER)
                or not s.isascii() or (fast is not None and s.translate(None, fast))]
    ids = [w[0] if w else b"" for w in words]
    problems: dict[int, RecordProblem] = {}
    if slow:
        lines = _header_lines(block)
        for i in slow:
            rec, problem = _slow_record(headers[i], bodies[i], name, int(lines[i]),
                                        block.first_index + i, alphabet, block.fmt)
            if problem is not None:
                problems[i] = problem
            else:
                ids[i], seqs[i] = rec.id.encode(), rec.sequence.encode()
    return ids, seqs, problems


def _fastq_parts(data: bytes) -> tuple[list[bytes], list[bytes]] | None:
    """Titles and sequence lines of a FASTQ block whose records are all sound (as
    :func:`gpuengine.fastq.check_record` checks), else None: then the line-by-line pass
    names the place. Only a block of ASCII without ``\x1c``-``\x1f`` (which ``str``
    strips as whitespace, ``bytes`` does not) is taken."""
    if not data.isascii() or any(c in data for c in (b"\x1c", b"\x1d", b"\x1e", b"\x1f")):
        return None
    lines = data.split(b"\n")
    lines.pop()  # after the last '\n'
    heads, seqs, plus, quals = lines[0::4], lines[1::4], lines[2::4], lines[3::4]
    if (len(lines) % 4 or not all(h[:1] == b"@" for h in heads)
            or not all(p[:1] == b"+" for p in plus)
            or list(map(len, map(bytes.rstrip, seqs))) != list(map(len, map(bytes.rstrip, quals)))
            or any(len(p) > 1 and p[1:].rstrip() and p[1:].rstrip() != h[1:].rstrip()
                   for p, h in zip(plus, heads))):
        return None
    return [h[1:] for h in heads], seqs


def _header_lines(block: Block) -> np.ndarray:
    """The 1-based line of each record's header in a block."""
    if block.fmt == "fastq":
        return block.first_line + 4 * np.arange(block.count)
    data, first_line = block.data, block.first_line
    raw = np.frombuffer(data, np.uint8)
    newlines = np.flatnonzero(raw == 10)
    after = newlines[:-1] + 1  # the last newline ends the block
    starts = np.concatenate(([0], after[raw[after] == ord(">")]))
    return first_line + np.searchsorted(newlines, starts)


def _slow_record(header: bytes, body: bytes, name: str, lineno: int, index: int,
                 alphabet: frozenset[str] | None, fmt: str
                 ) -> tuple[FastaRecord, RecordProblem | None]:
    """A record read the line-by-line pass's way: lines end only at ``\\n`` (as in its
    universal-newlines reading of the file, whose other line ends a block already made
    ``\\n``)."""
    text = body.decode("utf-8")
    lines = [line + "\n" for line in text.split("\n")]
    if text.endswith("\n") or not text:
        lines.pop()
    start = ">" if fmt == "fasta" else "@"
    return make_record(start + header.decode("utf-8") + "\n", lines, name, lineno, index,
                       alphabet)


def _store_conflicts(block: Block, name: str, stored: StoredRecords, ids: list[bytes],
                     seqs: list[bytes], valid, problems: dict[int, RecordProblem]) -> None:
    """Add the ``store-conflict`` problems of the ``valid`` records to ``problems``: asked of
    the whole block at once which ids the store holds where ``stored`` can (``held``), then
    ``stored.conflict`` of those records (of every record where it cannot)."""
    held = getattr(stored, "held", None)
    if held is not None:  # only the records whose ids the store holds are asked about
        chosen = [ids[i] for i in valid]
        if not chosen:
            return
        asked = [valid[k] for k in held(b"\n".join(chosen).decode("utf-8").split("\n"))]
    else:
        asked = valid
    lines = None
    for i in asked:
        if lines is None:
            lines = _header_lines(block)
        rec = FastaRecord(ids[i].decode("utf-8"), seqs[i].decode("utf-8"), name,
                          int(lines[i]), block.first_index + i)
        problem = stored.conflict(rec)
        if problem is not None:
            problems[i] = problem
