"""FASTA and FASTQ input as record-aligned byte blocks: the second pass's reader and parser.

:func:`read_blocks` reads a (plain or gzip) file in blocks of about :data:`BLOCK_BYTES`, each
cut at a record boundary and told where it starts (record index and line in the file), so
blocks can be parsed by several processes at once, in any order, and still name every record
as the first pass did. Line ends are normalised to ``\\n`` here (``\\r\\n`` and a lone ``\\r``
end lines, as in universal newlines mode), a UTF-8 byte-order mark and blank lines before the
first record are dropped, and a missing final newline is supplied.

:func:`parse_block` turns a block into the ids and normalised sequences (ASCII bytes) of its
valid records with a few C-level calls per record. A record the quick check does not pass
(an empty id or sequence, a header starting with whitespace, a character outside the
alphabet, anything not ASCII) is re-read the slow, exact way of :mod:`gpuengine.fasta`,
so ids, sequences and problem positions (line, column) are the first pass's.

A gzip file cannot be cut by byte range; its blocks come from one decompressing reader and
are parsed by the others (:mod:`gpuengine.input_workers`).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from gpuengine.errors import InputError
from gpuengine.fasta import _compile_alphabet, _name, _open_binary, _read_error, make_record
from gpuengine.pipe_frames import FRAME

BLOCK_BYTES = 1 << 19
"""Bytes a block holds (more when one record is larger)."""

_WHITESPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
"""What ``str.split()`` removes from a sequence, among the ASCII characters."""
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Block:
    """Whole records of one file: ``data`` (lines ending in ``\\n``) from record
    ``first_index`` (0-based, in the file) at line ``first_line`` (1-based)."""

    file: int
    """Position of the file among the run's inputs."""
    fmt: str
    """``fasta`` or ``fastq``."""
    data: bytes
    first_index: int
    first_line: int
    count: int
    """Records in the block."""


def _cut(buf: bytes, fmt: str) -> int:
    """Length of the longest prefix of ``buf`` (starting with a record) holding only whole
    records, before the last record, which may go on in the next read; 0 if none."""
    if fmt == "fasta":
        return buf.rfind(b"\n>") + 1
    ends = np.flatnonzero(np.frombuffer(buf, np.uint8) == 10)
    whole = ends.size // 4 * 4
    while whole > 0:  # never end a block with blank lines (they may only end the file)
        start = int(ends[whole - 5]) + 1 if whole > 4 else 0
        if buf[start:start + 1] == b"@":
            break
        whole -= 4
    return int(ends[whole - 1]) + 1 if whole > 0 else 0


def _count(data: bytes, fmt: str) -> tuple[int, int]:
    """(records, lines) of a block of whole records (``data`` starts with one and ends with a
    newline): ``data.count(b"\\n>") + 1`` (FASTA) or a quarter of its lines (FASTQ), and
    ``data.count(b"\\n")``, from one numpy pass (about five times faster than the two counts,
    and most of it outside the interpreter lock, which the engine's other threads want)."""
    codes = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(codes == 10)
    if fmt != "fasta":
        return ends.size // 4, ends.size
    follows = ends[ends < codes.size - 1] + 1
    return int(np.count_nonzero(codes[follows] == 62)) + 1, ends.size


def read_blocks(path: str | os.PathLike, file: int = 0,
                block_bytes: int = BLOCK_BYTES) -> Iterator[Block]:
    """The file's records as :class:`Block` s, in order (see the module docstring).

    Raises:
        InputError: the file cannot be read, is corrupt gzip, or starts with neither a FASTA
            nor a FASTQ record (the first pass checks this and more: here it means the file
            changed since).
    """
    name = _name(path)
    with _open_binary(path) as fh:
        carry, fmt, index, line, cr = b"", "", 0, 1, False
        while True:
            try:  # a record longer than a block: read as much again (linear, not quadratic)
                chunk = fh.read(max(block_bytes, len(carry)))
            except (EOFError, zlib.error, OSError) as exc:
                raise _read_error(path, name, line, exc) from exc
            eof = not chunk
            raw = b"\r" + chunk if cr else chunk  # a '\r' held back: is it a '\r\n'?
            cr = not eof and raw.endswith(b"\r")
            if cr:
                raw = raw[:-1]
            if b"\r" in raw:
                raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            buf = carry + raw
            if not fmt:
                if not eof and _BOM.startswith(buf[:len(_BOM)]) and len(buf) < len(_BOM):
                    carry = buf  # a byte-order mark may be cut in two
                    continue
                buf, skipped = _start(buf, name, eof)
                line += skipped
                if buf is None:
                    if eof:
                        return
                    carry = b""
                    continue
                fmt = "fasta" if buf[:1] == b">" else "fastq"
            if eof:  # what is left is the last block
                data = buf.rstrip(_WHITESPACE)
                if data:
                    data += b"\n"
                    yield Block(file, fmt, data, index, line, _count(data, fmt)[0])
                return
            cut = _cut(buf, fmt)
            if cut == 0:
                carry = buf
                continue
            data, carry = buf[:cut], buf[cut:]
            count, lines = _count(data, fmt)
            yield Block(file, fmt, data, index, line, count)
            index += count
            line += lines


def _start(buf: bytes, name: str, eof: bool) -> tuple[bytes | None, int]:
    """``buf`` from its first record on and the lines dropped before it; (None, lines)
    when ``buf`` holds only blank lines so far."""
    if buf.startswith(_BOM):
        buf = buf[len(_BOM):]
    body = buf.lstrip(_WHITESPACE)
    if not body:
        return None, 0 if eof else buf.count(b"\n")
    at = len(buf) - len(body)
    skipped = buf.count(b"\n", 0, at)
    if body[:1] not in (b">", b"@") or (at and buf[at - 1:at] != b"\n"):
        raise InputError(f"{name}:{skipped + 1}: not FASTA (nor FASTQ): it changed since it "
                         "was validated; run again")
    # whole lines before the first record are dropped; the header keeps its line
    return buf[at:], skipped


# ----------------------------------------------------------------------------- parsing


def parse_block(block: Block, name: str, alphabet: frozenset[str] | None,
                skip: Sequence[int] = ()) -> tuple[list[str], list[bytes]]:
    """Ids and normalised sequences (ASCII bytes) of the block's records, leaving out the
    records whose index (in the file) is in ``skip``.

    Raises:
        InputError: a record that is not skipped has a problem, or a FASTQ record is
            malformed: the file changed since the first pass, which found none.
    """
    if block.fmt == "fasta":
        headers, bodies = _fasta_parts(block.data)
    else:
        headers, bodies = _fastq_parts(block, name)
    seqs = [b.translate(None, _WHITESPACE).upper() for b in bodies]
    if b"*" in block.data:
        seqs = [s[:-1] if s[-1:] == b"*" else s for s in seqs]
    try:
        ids = [h.decode("utf-8").split(None, 1) for h in headers]
    except UnicodeDecodeError:
        ids = [[]] * len(headers)  # every record takes the slow path, which reports it
    fast = None if alphabet is None else _compile_alphabet(alphabet)[1]
    if alphabet is not None and fast is None:
        check = range(len(seqs))
    else:
        check = [i for i, (w, h, s) in enumerate(zip(ids, headers, seqs))
                 if not w or not s or h[:1].isspace() or not s.isascii()
                 or (fast is not None and s.translate(None, fast))]
    first = block.first_index
    drop = {i - first for i in skip}
    for i in check:
        if i in drop:
            continue
        record_id, seq = _slow(block, name, alphabet, i, headers[i], bodies[i])
        ids[i], seqs[i] = [record_id], seq
    keep = [i for i in range(len(seqs)) if i not in drop] if drop else range(len(seqs))
    if len(keep) == len(seqs):
        return [w[0] for w in ids], seqs
    return [ids[i][0] for i in keep], [seqs[i] for i in keep]


def _fasta_parts(data: bytes) -> tuple[list[bytes], list[bytes]]:
    parts = [p.partition(b"\n") for p in data[1:].split(b"\n>")]
    return [h for h, _, _ in parts], [b for _, _, b in parts]


def _fastq_parts(block: Block, name: str) -> tuple[list[bytes], list[bytes]]:
    lines = block.data.split(b"\n")
    lines.pop()  # after the last '\n'
    heads, seqs, plus, quals = lines[0::4], lines[1::4], lines[2::4], lines[3::4]
    if (len(lines) % 4 or not all(h[:1] == b"@" for h in heads)
            or not all(p[:1] == b"+" for p in plus)
            or [len(s.rstrip()) for s in seqs] != [len(q.rstrip()) for q in quals]
            or any(len(p) > 1 and p[1:].rstrip() != h[1:].rstrip() for p, h in zip(plus, heads))):
        _fastq_error(block, name, lines)
    return [h[1:] for h in heads], seqs


def _fastq_error(block: Block, name: str, lines: list[bytes]) -> None:
    """Raise the error the first pass gives for the block's first malformed record."""
    from gpuengine.fastq import check_record

    text = [line.decode("utf-8", "replace") for line in lines]
    for k in range(0, len(text), 4):
        record = text[k:k + 4] + [None] * (4 - len(text[k:k + 4]))
        try:
            check_record(name, block.first_line + k, block.first_index + k // 4, *record)
        except InputError as exc:
            raise InputError(f"{name} changed since it was validated: {exc}") from None
    raise InputError(f"{name} changed since it was validated (a malformed FASTQ record)")


def _slow(block: Block, name: str, alphabet: frozenset[str] | None, i: int, header: bytes,
          body: bytes) -> tuple[str, bytes]:
    """Record ``i`` of the block read as the first pass reads it: its id and sequence, or
    the InputError for its problem."""
    index = block.first_index + i
    if block.fmt == "fasta":
        lineno = block.first_line + _lines_before(block.data, i)
        head = ">"
    else:
        lineno, head = block.first_line + 4 * i, "@"
    try:
        text = head + header.decode("utf-8") + "\n"
        lines = body.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        raise InputError(f"{name}:{lineno}: bytes not valid UTF-8: it changed since it was "
                         "validated; run again") from None
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    record, problem = make_record(text, lines, name, lineno, index, alphabet)
    if problem is not None:
        raise InputError(f"{name} changed since it was validated: {problem.describe()}")
    return record.id, record.sequence.encode("utf-8")


def _lines_before(data: bytes, i: int) -> int:
    """Lines of a FASTA block before its record ``i`` (a slow path)."""
    at = 0
    for _ in range(i):
        at = data.index(b"\n>", at) + 1
    return data.count(b"\n", 0, at)


# ----------------------------------------------------------------------------- as frames

_BLOCK_HEAD = struct.Struct("<IQQIc")  # file number, first index, first line, records, format


def block_frame(block: Block) -> list:
    """A ``BLCK`` frame of ``block`` (for :func:`~gpuengine.pipe_frames.write_all`): the
    :data:`_BLOCK_HEAD`, then the block's bytes; how the engine deals blocks to its input and
    validation processes."""
    head = _BLOCK_HEAD.pack(block.file, block.first_index, block.first_line, block.count,
                            block.fmt[-1:].encode())  # a or q
    return [FRAME.pack(b"BLCK", len(head) + len(block.data)) + head, block.data]


def block_from(payload: bytearray) -> Block:
    """The block a ``BLCK`` frame's payload holds."""
    file, first, line, count, fmt = _BLOCK_HEAD.unpack_from(payload)
    return Block(file, "fastq" if fmt == b"q" else "fasta", bytes(payload[_BLOCK_HEAD.size:]),
                 first, line, count)
