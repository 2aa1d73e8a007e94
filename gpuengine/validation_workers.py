"""Validation processes: the first pass over a large file (:mod:`gpuengine.block_validation`)
shared among child processes, block by block.

Every record is read once before anything is embedded (to find the bad ones, hash the rest,
count and select); in one process that pass runs at about 1.5 µs a 150-bp read: 2 M reads kept
the device machine's 16 cores waiting about 3 s before the first batch, while the embedding
itself took 10 s. Here, as for the input processes (:mod:`gpuengine.input_workers`):

* a **feeder** thread in the engine reads the file as record-aligned blocks
  (:func:`gpuengine.blocks.read_blocks`) and deals them out in turn, block *b* to child *b mod N*,
  in the input processes' ``BLCK`` frames;
* each **child** (``python -m gpuengine.validation_workers``) takes each block as the
  one-process pass does (:func:`gpuengine.block_validation.take_block`, without the store) and
  answers one ``TALY`` frame (:func:`encode_tally`: the block's
  :class:`~gpuengine.block_validation.FileTally` as raw arrays, its problems as JSON, and the
  ids of its valid records), or ``LINE`` when the block must be read line by line (then the
  whole file is, as in one process);
* the engine reads the children in the same turn and adds each block's tally in block order,
  so the file's tally is the one-process pass's, record for record.

Hashes: the one-process pass hashes ids and sequences with Python's own hash, keyed per
process, so a child's would not match the engine's (its re-reads of repeated ids, files read
line by line). A validation that shares any file among processes hashes *every* record with
:func:`gpuengine.fasta._hashes`' ``stable`` hash (blake2b, the same everywhere; about five
times dearer, paid in the children), so the engine's part is reading blocks and joining
arrays.

The store: a child does not open it. The engine asks the store which of a block's valid ids it
holds (``held``, one read per id; nothing for a table the store does not have yet); a block
with any held id is taken again in the engine with the store, to find its ``store-conflict``
problems exactly as in one process (a rerun of an input already stored validates at the
one-process speed). Nothing crosses as pickle. A child ignores SIGINT and SIGTERM and runs in
its own session; the engine kills and reaps every child on every path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import struct
import sys
import threading
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable

from gpuengine.block_validation import FileTally, take_block
from gpuengine.blocks import block_frame, block_from, read_blocks
from gpuengine.errors import InputError, InternalError
from gpuengine.fasta import _compile_alphabet, StoredRecords
from gpuengine.pipe_frames import (GPUENGINE_ERRORS, child_main, close_pipes, error_from,
                                   how_it_ended, read_frame, start_child, write_all,
                                   write_frame)
from gpuengine.records import RecordProblem
from gpuengine.shards import Shard, ShardSelector


@dataclass(frozen=True)
class SharedPass:
    """How a first pass may share files among validation processes: ``count`` children, for
    files of at least ``min_bytes`` (on disk; gzip counts compressed), dealt blocks of
    ``block_bytes`` (None: the one-process pass's,
    :data:`gpuengine.block_validation.BLOCK_BYTES`)."""

    count: int
    min_bytes: int = 32 << 20
    """About 200 000 150-bp reads: a third of a second in one process, against about a tenth
    for the children's start."""
    block_bytes: int | None = None


VALIDATION_PROCESS_MIN = 4
"""Fewer validation processes than this do not pay: with the dearer stable hash, two children
on the 2-core machine took 1.45 s over 1 M 150-bp reads where one process took 1.3."""

_TALLY_HEAD = struct.Struct("<QQ8Q")
"""A ``TALY`` frame's head: records, residues, then the byte length of each section: id hashes,
sequence hashes, indices, lengths, selected, skipped, problems (JSON), the valid records' ids
(joined by ``\\n``)."""


def encode_tally(tally: FileTally, ids: list[bytes]) -> bytes:
    """A ``TALY`` payload: a block's tally and the ids of its valid records."""
    problems = json.dumps([dataclasses.asdict(p) for p in tally.problems]).encode("utf-8")
    sections = [tally.id_hashes, tally.seq_hashes, tally.indices.tobytes(),
                tally.lengths.tobytes(), tally.selected, tally.skipped.tobytes(), problems,
                b"\n".join(ids)]
    return b"".join([_TALLY_HEAD.pack(tally.records, tally.residues, *map(len, sections)),
                     *sections])


def decode_tally(payload: bytearray, max_problems: int) -> tuple[FileTally, bytes]:
    """(the block's tally, its valid ids joined by ``\\n``) of a ``TALY`` payload."""
    records, residues, *sizes = _TALLY_HEAD.unpack_from(payload)
    at, parts = _TALLY_HEAD.size, []
    for size in sizes:
        parts.append(payload[at:at + size])
        at += size
    id_hashes, seq_hashes, indices, lengths, selected, skipped, problems, ids = parts
    tally = FileTally(records=records, residues=residues, id_hashes=id_hashes,
                      seq_hashes=seq_hashes, selected=selected,
                      problems=[RecordProblem(**p) for p in json.loads(problems)],
                      max_problems=max_problems, stable=True)
    tally.indices.frombytes(indices)
    tally.lengths.frombytes(lengths)
    tally.skipped.frombytes(skipped)
    return tally, bytes(ids)


def takes_on(path: str | os.PathLike, shared: SharedPass | None,
             select: Callable[[str], bool] | None) -> bool:
    """Whether :func:`tally_in_processes` is for this file: ``shared`` allows at least
    :data:`VALIDATION_PROCESS_MIN` processes and the file is large enough, and there is no
    selection or a shard's (a child makes the same one)."""
    if (shared is None or shared.count < VALIDATION_PROCESS_MIN
            or not (select is None or type(select) is ShardSelector)):
        return False
    try:
        return os.path.getsize(path) >= shared.min_bytes
    except OSError:
        return False  # the one-process pass names the problem


class _Child:
    """One validation process; :meth:`close` kills (if running) and reaps it."""

    command = [sys.executable, "-m", "gpuengine.validation_workers"]

    def __init__(self, conf: bytes) -> None:
        self.proc = start_child(self.command)
        try:
            write_frame(self.proc.stdin, b"CONF", conf)
        except BrokenPipeError:
            pass  # the child died at once: answer() reports how

    def answer(self) -> tuple[bytes, bytearray]:
        """The next ``TALY`` or ``LINE`` frame; raises the child's error, or an InternalError
        naming how it ended."""
        try:
            frame = read_frame(self.proc.stdout)
        except (EOFError, OSError, ValueError):
            frame = None
        if frame is None:
            how = how_it_ended(self.proc, "closed its output")
            raise InternalError(f"the validation process (pid {self.proc.pid}) {how}")
        tag, payload = frame
        if tag == b"FAIL":
            raise error_from(payload, GPUENGINE_ERRORS, "validation process")
        if tag not in (b"TALY", b"LINE"):
            raise InternalError(f"validation process sent an unknown frame {tag!r}")
        return tag, payload

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        close_pipes(self.proc)


def tally_in_processes(path: str | os.PathLike, number: int, name: str,
                       alphabet: frozenset[str] | None, stored: StoredRecords | None,
                       select: ShardSelector | None, max_problems: int, processes: int,
                       block_bytes: int) -> FileTally | None:
    """:func:`gpuengine.block_validation.first_pass_blocks`' tally of file ``path`` (input
    ``number``, named ``name``; its start already checked), the blocks taken by ``processes``
    children; None when the file is one to read line by line."""
    held = None if stored is None else getattr(stored, "held", None)
    if stored is not None and held is None:
        raise InternalError("validation processes need a store that answers held(ids)")
    holds_ids = held is not None and getattr(stored, "spec", True) is not None  # the table
    conf = json.dumps({
        "name": name, "alphabet": None if alphabet is None else "".join(sorted(alphabet)),
        "shard": None if select is None else [select.shard.index, select.shard.count],
        "max_residues": None if select is None else select.max_residues,
        "max_problems": max_problems}).encode("utf-8")
    fast = None if alphabet is None else _compile_alphabet(alphabet)[1]
    children: list[_Child] = []
    sent: queue.SimpleQueue = queue.SimpleQueue()  # blocks sent, in order; None: no more
    stop = threading.Event()
    failure: list[BaseException] = []

    def feed() -> None:
        b = 0
        try:
            for block in read_blocks(path, number, block_bytes):
                if stop.is_set():
                    return
                sent.put(block)
                write_all(children[b % len(children)].proc.stdin.fileno(), block_frame(block))
                b += 1
        except BaseException as exc:  # noqa: BLE001 - the collector decides (in order)
            failure.append(exc)
        finally:
            for child in children:
                try:
                    child.proc.stdin.close()
                except OSError:
                    pass
            sent.put(None)

    tally = FileTally(max_problems=max_problems, stable=True)
    feeder = threading.Thread(target=feed, name="gpuengine-validation-feeder", daemon=True)
    try:
        for _ in range(processes):
            children.append(_Child(conf))
        feeder.start()
        b = 0
        while (block := sent.get()) is not None:  # kept for a re-take with the store
            tag, payload = children[b % len(children)].answer()
            b += 1
            if tag == b"LINE":
                return None
            part, ids = decode_tally(payload, max_problems)
            if holds_ids and ids and held(ids.decode("utf-8").split("\n")):
                part = FileTally(max_problems=max_problems, stable=True)  # store conflicts
                if not take_block(block, name, alphabet, fast, stored, select, part):
                    return None
            tally.add(part)
        if failure:
            if isinstance(failure[0], (InputError, OSError, EOFError, zlib.error)):
                return None  # read again line by line, which names the place
            raise failure[0]
        return tally
    finally:
        stop.set()
        for child in children:
            child.close()
        feeder.join()


# ----------------------------------------------------------------------------- child side


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """The child's loop: the configuration, then one answer per ``BLCK`` frame until the
    engine closes the input."""
    frame = read_frame(inp)
    if frame is None or frame[0] != b"CONF":
        raise InternalError("validation process: no configuration received")
    conf = json.loads(bytes(frame[1]).decode("utf-8"))
    alphabet = None if conf["alphabet"] is None else frozenset(conf["alphabet"])
    fast = None if alphabet is None else _compile_alphabet(alphabet)[1]
    select = None if conf["shard"] is None else Shard(*conf["shard"]).selector(
        conf["max_residues"])
    name, max_problems = conf["name"], conf["max_problems"]
    while (frame := read_frame(inp)) is not None:
        tag, payload = frame
        if tag != b"BLCK":
            raise InternalError(f"validation process: unexpected frame {bytes(tag)!r}")
        block = block_from(payload)
        tally, ids = FileTally(max_problems=max_problems, stable=True), []
        if take_block(block, name, alphabet, fast, None, select, tally, ids):
            write_frame(out, b"TALY", encode_tally(tally, ids))
        else:
            write_frame(out, b"LINE", b"")
        out.flush()


def main() -> int:
    """A validation process (``python -m gpuengine.validation_workers``)."""
    return child_main(serve)


if __name__ == "__main__":
    sys.exit(main())
