"""Streaming FASTA (and FASTQ) input: open, parse, normalise and validate.

Files are read a line at a time, never whole. A file whose first non-blank line starts with
``@`` is FASTQ (:mod:`gpuengine.fastq`; qualities are checked, then ignored). Plain and gzip files (told apart by the gzip
magic bytes, not the name; multi-member gzip and BGZF included) are read as UTF-8 with
universal newlines, so ``\\r\\n`` files work.

A record's id is what Biopython's ``SeqIO.parse(..., "fasta")`` reads: the header after ``>``
up to the first whitespace. Its sequence is its lines joined, every whitespace character
removed, upper-cased, with one trailing ``*`` stripped.

:func:`validate` is the first pass over all inputs. It finds the bad records and the ids given
twice from per-record 64-bit hashes kept in flat arrays (no dict of ids), so ten million
records fit in memory. It reads a file as blocks (:mod:`gpuengine.block_validation`, with
the same results), and line by line here only what that leaves (malformed FASTQ, files not
UTF-8 or unreadable, which it names the place of). :func:`stream_valid` is the second pass; it yields what to embed.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import re
import zlib
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from gpuengine.errors import InputError, InternalError
from gpuengine.records import FastaRecord, RecordProblem

if TYPE_CHECKING:
    from gpuengine.validation_workers import SharedPass

__all__ = ["ValidationReport", "iter_records", "open_text", "stream_valid", "validate"]

_OTHER_COMPRESSION = ((b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
                      (b"\x28\xb5\x2f\xfd", "zstd"), (b"PK\x03\x04", "zip"))
_SHOWN_PROBLEMS = 20  # problems listed in the error raised by validate()
_REREAD_BUDGET = 1 << 30  # bytes of ids and sequences one re-read of repeated ids may hold
_PER_ID_BYTES = 250  # what a repeated id costs besides its first sequence's residues



class StoredRecords(Protocol):
    """What validation asks of the store a run adds to (implemented by
    :class:`gpuengine.store.lookup.TableLookup`)."""

    def conflict(self, record: FastaRecord) -> RecordProblem | None:
        """The problem of a record whose id the store maps to another sequence, else None."""

    # Optional, asked first where given: ``held(ids) -> list[int]``, the positions of the
    # ids the store holds at all (only those records are then asked ``conflict``).


# ----------------------------------------------------------------------------- opening


def _name(path: str | os.PathLike) -> str:
    """The path as the user gave it, as text (used in records and messages)."""
    p = os.fspath(path)
    return os.fsdecode(p) if isinstance(p, bytes) else p


def _open_error(name: str, exc: OSError) -> InputError:
    return InputError(f"cannot open FASTA file {name}: {exc.strerror or exc}")


class _OwningGzipFile(gzip.GzipFile):
    """A GzipFile reading an open file object, which it closes when it is closed."""

    def close(self) -> None:
        owned = self.fileobj
        try:
            super().close()
        finally:
            if owned is not None:
                owned.close()


def _open_binary(path: str | os.PathLike) -> io.BufferedIOBase:
    """Open ``path`` for reading bytes, decompressing it if it starts with the gzip magic."""
    name = _name(path)
    try:
        raw = open(path, "rb")  # noqa: SIM115 - the caller closes it
    except OSError as exc:
        raise _open_error(name, exc) from exc
    try:
        head = raw.peek(8)[:8]
    except OSError as exc:
        raw.close()
        raise _open_error(name, exc) from exc
    if head[:2] == b"\x1f\x8b":
        return _OwningGzipFile(fileobj=raw, mode="rb")
    for magic, kind in _OTHER_COMPRESSION:
        if head.startswith(magic):
            raw.close()
            raise InputError(f"{name}: this is a {kind} file; only plain or gzip-compressed "
                             f"FASTA can be read. Decompress it (or recompress it with gzip).")
    return raw


def open_text(path: str | os.PathLike) -> io.TextIOBase:
    """Open a plain or gzip-compressed FASTA file as UTF-8 text.

    Gzip is recognised by its magic bytes (``1f 8b``) whatever the file is called, and
    multi-member gzip (so BGZF) is read to its end. Newlines are universal (``\\r\\n`` reads
    as ``\\n``) and a leading UTF-8 byte-order mark is dropped.

    Raises:
        InputError: the file is missing or unreadable (naming it and the system's reason),
            or is compressed with something other than gzip.
    """
    return io.TextIOWrapper(_open_binary(path), encoding="utf-8-sig", newline=None)


def _utf8_error_place(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """(line, column, byte) of the first byte of ``path`` that is not UTF-8, if found.

    A slow path, run only after a decode error. Lines end as in universal newlines mode.
    """
    try:
        with _open_binary(path) as binary:
            line = 1
            for raw in binary:
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    head = raw[: exc.start]
                    line += head.count(b"\r") - head.count(b"\r\n")
                    column = len(head.rsplit(b"\r", 1)[-1].decode("utf-8")) + 1
                    return line, column, raw[exc.start]
                line += 1 + raw.count(b"\r") - raw.count(b"\r\n")
    except (OSError, EOFError, zlib.error, InputError):
        pass
    return None


def _read_error(path: str | os.PathLike, name: str, lines_read: int, exc: Exception) -> InputError:
    """The InputError for an exception raised while reading ``path``."""
    if isinstance(exc, UnicodeDecodeError):
        place = _utf8_error_place(path)
        where = f"{name}:{place[0]}:{place[1]}" if place else f"{name}: after line {lines_read}"
        what = f"byte 0x{place[2]:02X} is not valid UTF-8" if place else "bytes not valid UTF-8"
        return InputError(f"{where}: {what}; FASTA must be UTF-8 (or ASCII) text. Is this a "
                          f"binary file, or text in another encoding?")
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
        return InputError(f"{name}: truncated or corrupt gzip data after line {lines_read} "
                          f"({exc}); the file is damaged or incomplete, fetch or compress it again")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
    return InputError(f"{name}: read error after line {lines_read}: {reason}")


# ----------------------------------------------------------------------------- parsing


def _first_line(path: str | os.PathLike, name: str, fh: io.TextIOBase) -> tuple[str, int]:
    """The first non-blank line (a FASTA header ``>`` or a FASTQ header ``@``) and its
    1-based number. Blank lines before it are skipped; other text means neither format."""
    lineno = 0
    try:
        for line in fh:
            lineno += 1
            if line[0] in ">@":
                return line, lineno
            if not line.isspace():
                raise InputError(f"{name}:{lineno}: not FASTA: the first non-blank line must be "
                                 f"a header starting with '>' (or '@' for FASTQ), found "
                                 f"{line.rstrip()[:60]!r}")
    except (UnicodeDecodeError, EOFError, zlib.error, OSError) as exc:
        raise _read_error(path, name, lineno, exc) from exc
    what = "is empty" if lineno == 0 else "holds only blank lines"
    raise InputError(f"{name}: no FASTA records: the file {what}")


def _raw_records(
    path: str | os.PathLike, name: str, fh: io.TextIOBase, header: str, start: int
) -> Iterator[tuple[str, int, list[str]]]:
    """Yield ``(header line, its 1-based number, the record's other lines)`` per record,
    from the first ``header`` (at line ``start``) on. Lines keep their ``\\n``."""
    lineno = start
    try:
        lines: list[str] = []
        append = lines.append
        for line in fh:
            lineno += 1
            if line[0] == ">":
                yield header, start, lines
                header, start, lines = line, lineno, []
                append = lines.append
            else:
                append(line)
    except (UnicodeDecodeError, EOFError, zlib.error, OSError) as exc:
        raise _read_error(path, name, lineno, exc) from exc
    yield header, start, lines


@functools.lru_cache(maxsize=32)
def _compile_alphabet(alphabet: frozenset[str]) -> tuple[Callable[[str], re.Match[str] | None],
                                                         bytes | None]:
    """A search for the first character not in ``alphabet``, and the alphabet as bytes.

    The bytes (``None`` unless all characters are ASCII) allow a faster check first: a
    sequence is valid if ``seq.encode().translate(None, those_bytes)`` is empty.
    """
    if not all(isinstance(c, str) and len(c) == 1 for c in alphabet):
        raise ValueError(f"alphabet entries must be single characters: {sorted(alphabet)!r}")
    text = "".join(sorted(alphabet))
    pattern = f"[^{re.escape(text)}]" if text else "(?s)."
    return re.compile(pattern).search, text.encode("ascii") if text.isascii() else None


def _locate(lines: list[str], header_line: int, position: int) -> tuple[int, int, str]:
    """Map ``position`` in a normalised sequence back to (line, column, character as written).

    Only run for a record with a bad character, so a per-character loop is fine.
    """
    seen = 0
    for offset, line in enumerate(lines):
        size = len("".join(line.split()).upper())
        if seen + size <= position:
            seen += size
            continue
        for column, char in enumerate(line, start=1):
            if not char.isspace():
                seen += len(char.upper())
                if seen > position:
                    return header_line + 1 + offset, column, char
    raise InternalError(f"cannot locate residue {position} of the record at line {header_line}")


def _problem(
    rec: FastaRecord, header: str, lines: list[str], alphabet: frozenset[str] | None
) -> RecordProblem | None:
    """The first problem of ``rec``, or ``None``: the slow path after a quick check failed."""
    if not rec.id:
        return RecordProblem("empty-id", rec.path, rec.line, "", rec.index,
                             detail="the header has no id; write one directly after '>'")
    if not rec.sequence:
        return RecordProblem("empty-sequence", rec.path, rec.line, rec.id, rec.index,
                             detail="the record has no residues")
    match = None if alphabet is None else _compile_alphabet(alphabet)[0](rec.sequence)
    if match is None:
        return None
    bad = match.group()
    line, column, written = _locate(lines, rec.line, match.start())
    allowed = "".join(sorted(alphabet))  # type: ignore[arg-type]
    detail = f"not in the alphabet {allowed}" if len(allowed) <= 64 else "not in the alphabet"
    if written != bad:
        detail += f" (written {written!r})"
    if bad == "*":
        detail += "; only one '*' is allowed, at the end of the sequence"
    return RecordProblem("invalid-character", rec.path, line, rec.id, rec.index, column, bad,
                         detail)


def make_record(header: str, lines: list[str], name: str, lineno: int, index: int,
                alphabet: frozenset[str] | None) -> tuple[FastaRecord, RecordProblem | None]:
    """The normalised record of a header line (``>`` or ``@`` first) and its sequence lines,
    with its first problem (see :func:`iter_records`)."""
    words = header[1:].split(None, 1)
    seq = "".join("".join(lines).split()).upper()
    if seq[-1:] == "*":
        seq = seq[:-1]
    rec = FastaRecord(words[0] if words else "", seq, name, lineno, index)
    fast = None if alphabet is None else _compile_alphabet(alphabet)[1]
    if (not words or not seq or header[1:2].isspace()
            or (alphabet is not None and (fast is None or seq.encode().translate(None, fast)))):
        return rec, _problem(rec, header, lines, alphabet)
    return rec, None


def iter_records(
    path: str | os.PathLike, *, alphabet: frozenset[str] | None = None
) -> Iterator[tuple[FastaRecord, RecordProblem | None]]:
    """Stream the records of one FASTA or FASTQ file, each with the first problem found in it.

    The format is told by the first non-blank line: ``>`` FASTA, ``@`` FASTQ (four lines a
    record, qualities checked for framing and length, then ignored: :mod:`gpuengine.fastq`).
    Yields ``(record, problem)``: the normalised record, and ``None`` or a problem of kind
    ``empty-id``, ``empty-sequence`` or ``invalid-character`` (only with an ``alphabet``;
    its line and column point at the character in the file).

    Raises:
        InputError: the file cannot be opened or read, is not UTF-8, is neither FASTA nor
            FASTQ, holds no records, is a malformed FASTQ file, or is a truncated or corrupt
            gzip file; naming the file, and the line (and column) where there is one.
    """
    name = _name(path)
    alphabet = None if alphabet is None else frozenset(alphabet)
    fast = None if alphabet is None else _compile_alphabet(alphabet)[1]
    check_chars = alphabet is not None
    with open_text(path) as fh:
        first, start = _first_line(path, name, fh)
        if first[0] == "@":
            from gpuengine.fastq import fastq_records

            yield from fastq_records(path, name, fh, first, start, alphabet)
            return
        index = 0
        for header, lineno, lines in _raw_records(path, name, fh, first, start):
            words = header[1:].split(None, 1)
            seq = "".join("".join(lines).split()).upper()
            if seq[-1:] == "*":
                seq = seq[:-1]
            rec = FastaRecord(words[0] if words else "", seq, name, lineno, index)
            if (not words or not seq or header[1:2].isspace()
                    or (check_chars and (fast is None or seq.encode().translate(None, fast)))):
                yield rec, _problem(rec, header, lines, alphabet)
            else:
                yield rec, None
            index += 1


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class ValidationReport:
    """What the first pass over the input found."""

    files: tuple[str, ...]
    records: int  # records read, all files
    valid: int  # distinct (id, sequence) records that will be embedded
    duplicate_records: int  # extra occurrences of an id with the same sequence (embedded once)
    problems: tuple[RecordProblem, ...]  # the first ``max_problems`` problems found
    problem_count: int  # all problems found
    skip: frozenset[tuple[str, int]] = field(repr=False)  # (path, index) the 2nd pass skips
    residues: int  # residues over the valid records
    selected: int | None = None  # of the valid records, those ``select`` took (None: no select)
    selected_residues: int = 0  # residues over the selected valid records


def _check_paths(paths: Sequence[str | os.PathLike]) -> tuple[str, ...]:
    """The names of ``paths``; refuse none at all, a missing file, or a file given twice."""
    names = tuple(_name(p) for p in paths)
    if not names:
        raise InputError("no input FASTA files given")
    seen: dict[tuple[int, int], str] = {}
    for path, name in zip(paths, names):
        try:
            st = os.stat(path)
        except OSError as exc:
            raise _open_error(name, exc) from exc
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise InputError(f"input file {name} is given twice (also as {seen[key]}), so each "
                             f"of its records would be read twice; give every file once")
        seen[key] = name
    return names


class _Tally:
    """Mutable state of :func:`validate`: counts, problems, skips and per-record hashes."""

    def __init__(self, names: tuple[str, ...], max_problems: int, stable: bool = False) -> None:
        self.names, self.max_problems = names, max_problems
        self.stable = stable  # the hashes: see _hashes
        self.records = self.residues = self.duplicates = self.problem_count = 0
        self.problems: list[RecordProblem] = []
        self.skip: set[tuple[str, int]] = set()
        # One entry per hashed (otherwise valid) record, in input order:
        self.id_hashes = bytearray()  # 8 bytes each
        self.seq_hashes = bytearray()  # 8 bytes each
        self.ordinals = array("Q")  # records in earlier files + index in its file
        self.lengths = array("I")  # residues
        self.file_starts: list[int] = []  # per file: records in earlier files
        self.selected: bytearray | None = None  # per hashed record: 1 if ``select`` took it
        self.selected_count = self.selected_residues = 0

    def problem(self, problem: RecordProblem) -> None:
        self.problem_count += 1
        if len(self.problems) < self.max_problems:
            self.problems.append(problem)

    def where(self, ordinals: np.ndarray) -> tuple[array, array]:
        """(file number, index in file) of global record ordinals, as compact arrays."""
        starts = np.asarray(self.file_starts, dtype=np.uint64)
        files = np.searchsorted(starts, ordinals, side="right") - 1
        return _array(files), _array(ordinals - starts[files])


def _first_pass(paths: Sequence[str | os.PathLike], tally: _Tally,
                alphabet: frozenset[str] | None, stored: StoredRecords | None,
                select: Callable[[str], bool] | None = None,
                shared: SharedPass | None = None) -> None:
    """Read every file once: note the problems, hash every otherwise valid record (and note
    which ones ``select`` takes). A file is read as blocks
    (:mod:`gpuengine.block_validation`, several times faster); one that pass leaves
    (malformed FASTQ, not UTF-8, unreadable) line by line here."""
    ids, seqs, ordinals, lengths = tally.id_hashes, tally.seq_hashes, tally.ordinals, tally.lengths
    selected = tally.selected = bytearray() if select is not None else None
    from gpuengine.block_validation import first_pass_blocks

    for number, (name, path) in enumerate(zip(tally.names, paths)):
        base = tally.records
        tally.file_starts.append(base)
        found = first_pass_blocks(path, number, alphabet, stored, select,
                                  max(0, tally.max_problems - len(tally.problems)), shared,
                                  tally.stable)
        if found is not None:
            _add_file(tally, name, base, found)
            continue
        residues = count = 0
        for rec, problem in iter_records(path, alphabet=alphabet):
            count += 1
            if problem is None and stored is not None:
                problem = stored.conflict(rec)
            if problem is not None:
                tally.problem(problem)
                tally.skip.add((name, rec.index))
                continue
            ids += _hash(rec.id, tally.stable)
            seqs += _hash(rec.sequence, tally.stable)
            ordinals.append(base + rec.index)
            lengths.append(len(rec.sequence))
            residues += len(rec.sequence)
            if selected is not None:
                took = select(rec.sequence)
                selected.append(took)
                if took:
                    tally.selected_count += 1
                    tally.selected_residues += len(rec.sequence)
        tally.records = base + count
        tally.residues += residues


def _add_file(tally: _Tally, name: str, base: int, found) -> None:
    """Add what :func:`gpuengine.block_validation.first_pass_blocks` found in one file (its
    records numbered from ``base``) to ``tally``."""
    for problem in found.problems:
        tally.problem(problem)
    tally.problem_count += len(found.skipped) - len(found.problems)
    tally.skip.update(zip([name] * len(found.skipped), found.skipped))
    tally.id_hashes += found.id_hashes
    tally.seq_hashes += found.seq_hashes
    tally.ordinals.frombytes((np.frombuffer(found.indices, dtype=np.uint64)
                              + np.uint64(base)).tobytes())
    tally.lengths += found.lengths
    if tally.selected is not None:
        tally.selected += found.selected
        took = np.frombuffer(found.selected, dtype=np.uint8).astype(bool)
        tally.selected_count += int(np.count_nonzero(took))
        tally.selected_residues += int(np.frombuffer(found.lengths, dtype=np.uint32)[took]
                                       .sum(dtype=np.uint64))
    tally.records = base + found.records
    tally.residues += found.residues


def _repeated_id_batches(tally: _Tally) -> Iterator[np.ndarray]:
    """Positions (in the hash arrays) of the records whose id hash is not unique.

    They come in batches, each in input order, that never split the records of one id
    hash; a batch holds about :data:`_REREAD_BUDGET` bytes of first sequences when read
    again. All of them are re-read, even where the sequence hashes agree: a collision of
    those must not pass a conflicting duplicate as a harmless one.
    """
    id_hashes = np.frombuffer(tally.id_hashes, dtype=np.uint64)
    order = np.argsort(id_hashes, kind="stable")
    ranked = id_hashes[order]
    member = np.zeros(ranked.size, dtype=bool)
    member[1:] = ranked[1:] == ranked[:-1]
    member[:-1] |= member[1:]
    order, ranked = order[member], ranked[member]
    if not order.size:
        return
    group_start = np.ones(order.size, dtype=bool)
    group_start[1:] = ranked[1:] != ranked[:-1]
    lengths = np.frombuffer(tally.lengths, dtype=np.uint32)[order].astype(np.uint64)
    cost = np.where(group_start, lengths + _PER_ID_BYTES, 0)
    batch = np.cumsum(cost) // _REREAD_BUDGET
    for number in np.unique(batch):
        yield np.sort(order[batch == number])


def _array(values: np.ndarray) -> array:
    """``values`` as an ``array('Q')``: its items read fast, and do not live as objects."""
    return array("Q", values.astype(np.uint64).tobytes())


_hash_bytes = hash
"""The 64-bit hash of a record's id or sequence bytes: Python's own, keyed SipHash, about
twenty times cheaper than a new blake2b each. The first pass compares them only within this
process (whose key they depend on), and a collision of ids costs only a re-read
(:func:`_reread` compares the records for real)."""


def _hashes(items: Sequence[bytes], stable: bool = False) -> bytes:
    """8 bytes per item: :data:`_hash_bytes` of each (little-endian signed), or with
    ``stable`` the first 8 bytes of its blake2b, the same in every process: a first pass
    shared among validation processes (:mod:`gpuengine.validation_workers`) hashes there,
    where the five times dearer hash is paid in parallel."""
    if stable:
        return b"".join([hashlib.blake2b(item, digest_size=8).digest() for item in items])
    return np.fromiter(map(_hash_bytes, items), np.int64, len(items)).astype("<i8").tobytes()


def _hash(text: str, stable: bool = False) -> bytes:
    """:func:`_hashes` of one text, without an array (the line pass and the re-read ask
    record by record)."""
    if stable:
        return hashlib.blake2b(text.encode(), digest_size=8).digest()
    return _hash_bytes(text.encode()).to_bytes(8, "little", signed=True)


class _Repeats:
    """The re-read records of a batch (in input order) and their groups by real id."""

    def __init__(self) -> None:
        self.group, self.line = array("Q"), array("Q")  # per record: id number, header line
        self.same = bytearray()  # per record: 1 if its id's first sequence
        self.first = array("Q")  # per id number: the record that gave it first
        self.numbers: dict[str, int] = {}  # id -> number, numbered in first-seen order
        self.first_sequences: list[str] = []  # per id number


def _reread(paths: Sequence[str | os.PathLike], tally: _Tally, positions: np.ndarray) -> _Repeats:
    """Read the records at ``positions`` again, comparing ids and sequences for real.

    Hashes that differ from the first pass's mean that the file changed in between.
    """
    out = _Repeats()
    ids, seqs = tally.id_hashes, tally.seq_hashes
    files, indices = tally.where(np.frombuffer(tally.ordinals, dtype=np.uint64)[positions])
    at_list = _array(positions * 8)
    k = 0
    for number, (name, path) in enumerate(zip(tally.names, paths)):
        for rec, _ in iter_records(path) if k < len(files) and files[k] == number else ():
            if rec.index != indices[k]:
                continue
            at = at_list[k]
            if (_hash(rec.id, tally.stable) != ids[at : at + 8]
                    or _hash(rec.sequence, tally.stable) != seqs[at : at + 8]):
                break
            group = out.numbers.setdefault(rec.id, len(out.first_sequences))
            if group == len(out.first_sequences):
                out.first_sequences.append(rec.sequence)
                out.first.append(k)
            out.group.append(group)
            out.line.append(rec.line)
            out.same.append(rec.sequence == out.first_sequences[group])
            k += 1
            if k == len(files) or files[k] != number:
                break
        if k < len(files) and files[k] <= number:
            raise InputError(f"{name} changed while it was being validated; run again")
    return out


def _judge_repeats(tally: _Tally, positions: np.ndarray, reads: _Repeats) -> None:
    """Count harmless repeats, report conflicting ones, and skip both."""
    group = np.frombuffer(reads.group, dtype=np.uint64).astype(np.intp)
    same = np.frombuffer(reads.same, dtype=np.uint8).astype(bool)
    count = np.bincount(group)
    conflict = (np.bincount(group, weights=~same) > 0)[group]
    first = np.frombuffer(reads.first, dtype=np.uint64).astype(np.intp)
    later = np.ones(group.size, dtype=bool)
    later[first] = False  # (a group of one is its id-hash colliding with another id's)
    skip = (count[group] > 1) & (later | conflict)
    tally.duplicates += int(np.count_nonzero(later & ~conflict))
    lengths = np.frombuffer(tally.lengths, dtype=np.uint32)[positions].astype(np.uint64)
    tally.residues -= int(lengths[skip].sum())
    if tally.selected is not None:
        took = np.frombuffer(tally.selected, dtype=np.uint8)[positions].astype(bool) & skip
        tally.selected_count -= int(np.count_nonzero(took))
        tally.selected_residues -= int(lengths[took].sum())
    ordinals = np.frombuffer(tally.ordinals, dtype=np.uint64)[positions]
    files, indices = tally.where(ordinals[skip])
    tally.skip.update(zip([tally.names[f] for f in files], indices))
    record_ids = list(reads.numbers)
    files, indices = tally.where(ordinals)
    for k in np.flatnonzero(later & conflict).tolist():
        f = first[group[k]]
        what = (f"a different sequence ({lengths[f]} vs {lengths[k]} residues)" if not same[k]
                else "the same sequence, but other occurrences have a different one")
        detail = (f"id first given at {tally.names[files[f]]}:{reads.line[f]} with {what}; "
                  f"every occurrence of this id is skipped")
        tally.problem(RecordProblem("conflicting-duplicate", tally.names[files[k]], reads.line[k],
                                    record_ids[group[k]], indices[k], detail=detail))


def _failure(report: ValidationReport) -> InputError:
    """The error for problems that may not be skipped, with ``report`` as ``.report``."""
    shown = report.problems[:_SHOWN_PROBLEMS]
    files = f"{len(report.files)} file{'s' if len(report.files) != 1 else ''}"
    lines = [f"{report.problem_count} problem{'s' if report.problem_count != 1 else ''} in "
             f"the input FASTA ({report.records} records in {files}):"]
    lines += [f"  {p.describe()}" for p in shown]
    if report.problem_count > len(shown):
        lines.append(f"  ... and {report.problem_count - len(shown)} more")
    lines.append(f"Fix these records, or rerun with --skip-invalid to skip them "
                 f"({len(report.skip)} records would be skipped, {report.valid} embedded).")
    error = InputError("\n".join(lines))
    error.report = report  # type: ignore[attr-defined]
    return error


def validate(
    paths: Sequence[str | os.PathLike],
    *,
    alphabet: frozenset[str] | None,
    skip_invalid: bool = False,
    max_problems: int = 1000,
    stored: StoredRecords | None = None,
    select: Callable[[str], bool] | None = None,
    shared: SharedPass | None = None,
) -> ValidationReport:
    """First pass over all input files: find the bad records and the ids given twice.

    A record's problems are those of :func:`iter_records`, then its conflict with the store
    (``stored.conflict``, asked of each otherwise valid record). An id given with two different
    sequences, in one file or across files, is a ``conflicting-duplicate``: each occurrence
    after the first is reported, naming the first, and every occurrence is skipped. An id
    repeated with the same sequence is counted in ``duplicate_records`` and embedded once.

    Duplicates are found by sorting 64-bit hashes of the ids (:func:`_hashes`); the records sharing
    an id hash are then read again and compared for real, so a hash collision never yields
    a false problem. Memory is 28 bytes per record (twice that while sorting), plus each
    repeated id and its first sequence (those re-read in batches of about 1 GiB).

    ``select(sequence)`` (a shard's membership test) is asked of every otherwise valid
    record; the report's ``selected`` and ``selected_residues`` count the valid records it
    took (a repeat skipped here is not counted).

    A large file is read by child processes as ``shared`` allows
    (:mod:`gpuengine.validation_workers`): the same report, sooner.

    Raises:
        InputError: no paths, a path given twice, an unreadable or non-FASTA file, or, unless
            ``skip_invalid``, any problem at all; then the report is its ``.report``.
    """
    names = _check_paths(paths)
    from gpuengine.validation_workers import takes_on

    stable = any(takes_on(path, shared, select) for path in paths)
    tally = _Tally(names, max_problems, stable=stable)
    _first_pass(paths, tally, alphabet, stored, select, shared if stable else None)
    for positions in _repeated_id_batches(tally):
        _judge_repeats(tally, positions, _reread(paths, tally, positions))
    report = ValidationReport(
        files=names, records=tally.records, valid=tally.records - len(tally.skip),
        duplicate_records=tally.duplicates, problems=tuple(tally.problems),
        problem_count=tally.problem_count, skip=frozenset(tally.skip), residues=tally.residues,
        selected=None if select is None else tally.selected_count,
        selected_residues=tally.selected_residues,
    )
    if report.problem_count and not skip_invalid:
        raise _failure(report)
    return report


def stream_valid(
    paths: Sequence[str | os.PathLike],
    report: ValidationReport,
    *,
    alphabet: frozenset[str] | None,
) -> Iterator[FastaRecord]:
    """Second pass: yield every record not in ``report.skip``, in file order, streaming.

    Raises:
        InputError: a file cannot be read any more, or changed since :func:`validate` read
            it (a record that passed now has a problem).
        InternalError: ``paths`` are not the files ``report`` was made from.
    """
    names = tuple(_name(p) for p in paths)
    if names != report.files:
        raise InternalError(f"stream_valid got files {names}, the report is for {report.files}")
    skipped: dict[str, set[int]] = {name: set() for name in names}
    for name, index in report.skip:
        skipped[name].add(index)
    for name, path in zip(names, paths):
        skip = skipped[name]
        for rec, problem in iter_records(path, alphabet=alphabet):
            if rec.index in skip:
                continue
            if problem is not None:
                raise InputError(f"{name} changed since it was validated: {problem.describe()}")
            yield rec
