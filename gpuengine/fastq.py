"""FASTQ records, read a line at a time (the first pass; :mod:`gpuengine.fasta` opens the file
and hands over when its first non-blank line starts with ``@``).

A record is four lines, as sequencers write them (and as Biopython's ``FastqGeneralIterator``
and cutadapt's dnaio read them; multi-line FASTQ is refused):

1. ``@`` and the title; the record's id is the title up to the first whitespace, as in FASTA;
2. the sequence, normalised as a FASTA sequence (whitespace removed, upper case, one
   trailing ``*`` stripped);
3. ``+``, optionally followed by the same title again;
4. the qualities: exactly as many characters as the sequence line. They are checked for
   that and otherwise ignored (embeddings are of sequences).

Blank lines may follow the last record, not stand between records. A malformed record (a
missing ``@`` or ``+``, a quality line of another length, a file that ends inside a record) is an
:class:`~gpuengine.errors.InputError` naming file, line and column: the framing is broken,
so it cannot be skipped like a record with a bad residue (those come out as a
:class:`~gpuengine.records.RecordProblem`, as in FASTA).
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Iterator

from gpuengine.errors import InputError
from gpuengine.records import FastaRecord, RecordProblem

_PARTS = ("header", "sequence", "'+' separator")


def _show(line: str) -> str:
    return repr(line.rstrip("\r\n")[:60])


def check_record(name: str, lineno: int, index: int, header: str, seq: str | None,
                 plus: str | None, qual: str | None) -> None:
    """Raise the InputError for a malformed record whose header is at ``lineno`` (lines
    without their line ends; None where the file ended first); return when it is sound."""
    rid = header[1:].split(None, 1)[0] if header[1:].split() else ""
    what = f"FASTQ record {rid!r} (#{index + 1} in file)"
    if not header.startswith("@"):
        raise InputError(f"{name}:{lineno}:1: FASTQ record #{index + 1}: expected a header line "
                         f"starting with '@', found {_show(header)}; FASTQ records are four "
                         f"lines (multi-line FASTQ is not supported)")
    for offset, line in enumerate((seq, plus, qual)):
        if line is None:
            raise InputError(f"{name}:{lineno + offset}: truncated {what}: the file ends "
                             f"after its {_PARTS[offset]} line; the file is incomplete")
    if not plus.startswith("+"):
        raise InputError(f"{name}:{lineno + 2}:1: {what}: expected the '+' separator line, "
                         f"found {_show(plus)}; FASTQ records are four lines (multi-line FASTQ "
                         f"is not supported)")
    title = plus[1:].rstrip()
    if title and title != header[1:].rstrip():
        raise InputError(f"{name}:{lineno + 2}:2: {what}: the '+' line repeats another title "
                         f"({title[:60]!r}) than the header's")
    s, q = len(seq.rstrip()), len(qual.rstrip())
    if s != q:
        raise InputError(f"{name}:{lineno + 3}:{min(s, q) + 1}: {what}: the quality line has "
                         f"{q} characters and the sequence {s}; they must be as long")


def fastq_records(path: str | os.PathLike, name: str, fh: io.TextIOBase, first: str,
                  start: int, alphabet: frozenset[str] | None
                  ) -> Iterator[tuple[FastaRecord, RecordProblem | None]]:
    """The records of an open FASTQ file whose first header ``first`` is line ``start``,
    each with its first problem (:func:`gpuengine.fasta.make_record`)."""
    from gpuengine.fasta import _read_error, make_record

    lineno, index, header = start, 0, first
    readline = fh.readline
    try:
        while True:
            seq, plus, qual = readline() or None, readline() or None, readline() or None
            check_record(name, lineno, index, header.rstrip("\r\n"),
                         *(None if x is None else x.rstrip("\r\n") for x in (seq, plus, qual)))
            yield make_record(header, [seq], name, lineno, index, alphabet)
            index += 1
            lineno += 4
            header = readline()
            blank = lineno
            while header and header.isspace():  # blank lines: only after the last record
                lineno += 1
                header = readline()
            if not header:
                return
            if lineno != blank:
                raise InputError(f"{name}:{blank}: a blank line between FASTQ records (before "
                                 f"record #{index + 1}); FASTQ records are four lines each")
            if not header.startswith("@"):
                check_record(name, lineno, index, header.rstrip("\r\n"), None, None, None)
    except (UnicodeDecodeError, EOFError, zlib.error, OSError) as exc:
        raise _read_error(path, name, lineno, exc) from exc
