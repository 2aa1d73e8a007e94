"""The input side of a run: records in, prepared chunks out (torch-free).

A run's records come from a :class:`RecordSource`: the valid records of FASTA files
(:func:`validated_fasta`, the first pass over the input) or records a workflow derives
(``predict``'s frames; with a :class:`Derivation` the input processes derive them from the
FASTA records they parse). :func:`open_input` turns them into prepared chunks: up to
:data:`LOOKUP_CHUNK` records each, truncated, hashed and tokenized by :func:`prepare_chunk`,
so the planner has one path whatever reads them. A sharded run (``--shard I/N``,
:mod:`gpuengine.shards`) keeps only its shard's records there, right after hashing and before
tokenizing, in whichever process reads. Where they are read is chosen once:

* in **child processes** (:class:`~gpuengine.input_workers.InputPool`, ``python -m
  gpuengine.inputs``: by default the cores this process may use less two, bounded as
  :func:`~gpuengine.input_workers.process_count` says; ``GPUENGINE_INPUT_PROCESSES`` sets the
  number), for FASTA or FASTQ input
  of at least :data:`INPUT_PROCESS_MIN_RECORDS` records (or as ``input_process`` /
  ``GPUENGINE_INPUT_PROCESS`` say): reading, normalising, hashing and tokenizing hold the
  GIL, and in the engine's process they compete with the device workers and the committer;
  the children share them out block by block (:mod:`gpuengine.input_workers`);
* else **in the planner's thread** (:class:`InThreadInput`): a child's start-up (0.1-0.2 s)
  would cost more than it saves, and in-memory records cannot cross to a child.

Nothing crosses the process boundary as pickle. Both directions are frames: a 4-byte tag, a
little-endian uint64 payload length, the payload.

* parent → child: ``CONF`` (UTF-8 JSON: paths, alphabet, max_residues, tokenizer spec,
  shard, derivation), then one ``SKIP`` per file (uint64 record indices the second pass skips), then
  ``BLCK`` blocks.
* child → parent: ``CHNK`` per chunk (layout in :func:`encode_chunk`), ``BEND`` after each
  block's, then ``DONE``; or ``FAIL`` (UTF-8 JSON: error class name and message) when
  reading failed.

A child ignores SIGINT and SIGTERM and runs in its own session: the engine decides when it
stops (Ctrl-C drains the run; closing the reader kills the children). If the engine dies, a
child's next read or write fails on the broken pipe and it exits.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from gpuengine.errors import InternalError
from gpuengine.fasta import StoredRecords, ValidationReport, stream_valid, validate
from gpuengine.pipe_frames import FRAME, child_main
from gpuengine.records import FastaRecord
from gpuengine.shards import Shard

if TYPE_CHECKING:
    from gpuengine.validation_workers import SharedPass

LOOKUP_CHUNK = 1024
"""Records per prepared chunk (the planner looks each chunk's ids up in the store at once)."""
MAX_READ_CHUNK = 65_536
"""Most records read for one chunk of a sharded run (which reads LOOKUP_CHUNK × N records
to keep about LOOKUP_CHUNK of them)."""
INPUT_PROCESS_MIN_RECORDS = 20_000
"""Smaller FASTA inputs are read in the planner thread when the config leaves it open (the
child process costs a start-up of about 0.1-0.2 s)."""

_CHUNK_HEAD = struct.Struct("<IIQ")  # records, outputs with embedding keys, bytes of the ids


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class FastaInput:
    """FASTA files and what their validation found (the second pass skips ``report.skip``)."""

    paths: tuple
    report: ValidationReport
    alphabet: frozenset[str] | None


@dataclass(frozen=True)
class Derivation:
    """Records a workflow derives from the valid records of FASTA files (``predict``'s frames
    from its reads), made by whichever reader parses the records: ``function``
    (``"gpuengine.<module>:<name>"``, a torch-free function of gpuengine) is called on each block's
    ``(ids, sequences)`` with ``args`` (JSON values) and returns the ``(ids, sequences)`` to
    embed in their place. The input side knows only this name, not the workflow: an input
    process imports the module itself (:func:`derive_function`)."""

    function: str
    args: dict


def derive_function(derivation: dict | None) -> Callable | None:
    """``(ids, seqs) -> (ids, seqs)`` of a :class:`Derivation` given as a dict (how the
    ``CONF`` frame carries it); None for none. Only functions of gpuengine are taken."""
    if derivation is None:
        return None
    import importlib

    module, _, name = derivation["function"].partition(":")
    if not module.startswith("gpuengine.") or not name:
        raise InternalError(f"input derivation {derivation['function']!r} is not a function "
                            "of gpuengine")
    function = getattr(importlib.import_module(module), name)
    args = dict(derivation["args"])
    return lambda ids, seqs: function(ids, seqs, **args)


@dataclass(frozen=True)
class RecordSource:
    """Already-valid records to embed; ``iterate`` must give the same records, in the same
    order, every call (workflows such as ``predict`` derive them)."""

    iterate: Callable[[], Iterable[FastaRecord]]
    count: int
    residues: int
    fasta: FastaInput | None = None
    """Set when the records are the valid ones of FASTA files: the input process can read
    them itself."""
    shard: Shard | None = None
    """Only this shard's records are embedded (``count`` and ``residues`` are the shard's);
    ``iterate`` still gives every record, the chunk reader keeps the shard's."""
    derive: Derivation | None = None
    """With ``fasta``: the records are derived from the files' valid records
    (``iterate`` gives the derived ones, in the same order, for a reader in the planner's
    thread); ``count`` and ``residues`` are the derived records'."""
    pick: Callable[[Sequence[int]], list[FastaRecord]] | None = None
    """Optional: the records at these (sorted) positions of ``iterate``'s order, the same
    ones, found without going through all of them (the fp8 guard's sample)."""

    def counts(self) -> dict:
        """The run summary's input counts (records read, valid, skipped, repeated; a
        sharded run's shard and its records)."""
        if self.fasta is None or self.derive is not None:
            counts = dict(records_read=self.count, valid_records=self.count)
        else:
            report = self.fasta.report
            counts = dict(records_read=report.records, valid_records=report.valid,
                          invalid_skipped=len(report.skip) - report.duplicate_records,
                          duplicate_records=report.duplicate_records)
        if self.shard is not None:
            counts.update(shard=self.shard.label, shard_records=self.count)
        return counts


def validated_fasta(paths: Sequence[str | os.PathLike], alphabet: frozenset[str] | None, *,
                    skip_invalid: bool, stored: StoredRecords | None,
                    shard: Shard | None = None, max_residues: int | None = None,
                    shared: SharedPass | None = None) -> RecordSource:
    """Validate ``paths`` (InputError on a problem unless ``skip_invalid``; a record whose id
    ``stored`` maps to another sequence is one) and return their valid records. With a
    ``shard``, the whole input is still validated (every shard judges it alike) and the
    source counts the records of the shard (sequences truncated to ``max_residues``). Large
    files are validated by child processes as ``shared`` allows."""
    paths = list(paths)
    select = None if shard is None else shard.selector(max_residues)
    report = validate(paths, alphabet=alphabet, skip_invalid=skip_invalid, stored=stored,
                      select=select, shared=shared)
    count, residues = report.valid, report.residues
    if shard is not None:
        count, residues = report.selected or 0, report.selected_residues
    return RecordSource(lambda: stream_valid(paths, report, alphabet=alphabet), count,
                        residues, FastaInput(tuple(paths), report, alphabet), shard)


@dataclass(frozen=True)
class PreparedChunk:
    """What the planner needs of up to :data:`LOOKUP_CHUNK` valid records, in input order."""

    ids: list[str]
    digests: list[bytes]
    """blake2b-16 of each embedded (possibly truncated) sequence."""
    residues: np.ndarray
    """uint32: residues embedded (after truncation)."""
    truncated: np.ndarray
    """uint8: 1 where the sequence was cut to max_residues."""
    tokens: np.ndarray
    """int32: every record's token ids, specials included, one after the other."""
    ends: np.ndarray
    """int64: where each record's ids end in ``tokens``."""
    embedding_keys: tuple[list[bytes], ...] = ()
    """Per output of the table (when the reader was given its key prefixes), each record's
    embedding key (``blake2b-16(prefix + digest)``): computed where the chunk is prepared, so
    the store writer does not hash in the engine's process. Empty: not computed."""

    def token_ids(self, i: int) -> np.ndarray:
        return self.tokens[(self.ends[i - 1] if i else 0):self.ends[i]]


def prepare_chunk(records: Sequence, tokenizer, max_residues: int | None,
                  shard: Shard | None = None, key_prefixes: Sequence[bytes] = ()) -> PreparedChunk:
    """Truncate, hash and tokenize ``records`` (FastaRecord-like: ``.id``, ``.sequence``);
    with a ``shard``, only the records of that shard are kept (after hashing, before
    tokenizing); with ``key_prefixes`` (one per output), their embedding keys too."""
    return prepare_lists([r.id for r in records], [r.sequence for r in records], tokenizer,
                         max_residues, shard, key_prefixes)


def prepare_lists(ids: list[str], seqs: list[str], tokenizer, max_residues: int | None,
                  shard: Shard | None = None, key_prefixes: Sequence[bytes] = ()) -> PreparedChunk:
    """:func:`prepare_chunk` of records given as their ids and sequences."""
    from gpuengine.store.codec import embedding_keys, sequence_digests

    n = len(seqs)
    truncated = np.zeros(n, np.uint8)
    if max_residues is not None and n and max(map(len, seqs)) > max_residues:
        truncated = np.fromiter((len(s) > max_residues for s in seqs), np.uint8, n)
        seqs = [s[:max_residues] for s in seqs]
    digests = sequence_digests(seqs)
    if shard is not None:
        keep = shard.positions(digests)
        if len(keep) < n:
            ids = [ids[i] for i in keep]
            seqs = [seqs[i] for i in keep]
            digests = [digests[i] for i in keep]
            truncated = truncated[keep]
            n = len(keep)
        if n == 0:
            return PreparedChunk([], [], np.zeros(0, np.uint32), np.zeros(0, np.uint8),
                                 np.zeros(0, np.int32), np.zeros(0, np.int64))
    encode_flat = getattr(tokenizer, "encode_flat", None)
    if encode_flat is not None:  # the ESM tokenizer: one buffer, no array per sequence
        tokens, ends = encode_flat(seqs)
    else:
        token_ids = tokenizer.encode_batch(seqs)
        ends = np.cumsum(np.fromiter((t.size for t in token_ids), np.int64, n))
        tokens = (np.concatenate(token_ids).astype(np.int32, copy=False) if n
                  else np.zeros(0, np.int32))
    keys = tuple(embedding_keys(prefix, digests) for prefix in key_prefixes)
    return PreparedChunk(ids, digests,
                         np.fromiter(map(len, seqs), np.uint32, n), truncated, tokens, ends, keys)


# ----------------------------------------------------------------------------- wire format


def encode_chunk(chunk: PreparedChunk) -> list[bytes | memoryview]:
    """A ``CHNK`` frame as parts to write: head (records, outputs with embedding keys, bytes
    of ids), ends (int64), residues (uint32), tokens (int32), digests (16 bytes each),
    truncated (uint8), the embedding keys output by output (16 bytes each), ids joined by
    ``\\n`` (UTF-8; an id never holds whitespace). Each array starts at a multiple of its
    item size."""
    n = len(chunk.ids)
    ids = "\n".join(chunk.ids).encode("utf-8")
    parts = [_CHUNK_HEAD.pack(n, len(chunk.embedding_keys), len(ids)),
             chunk.ends.astype("<i8").data, chunk.residues.astype("<u4").data,
             chunk.tokens.astype("<i4").data, b"".join(chunk.digests),
             chunk.truncated.astype(np.uint8).data,
             *(b"".join(keys) for keys in chunk.embedding_keys), ids]
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    return [FRAME.pack(b"CHNK", size), *parts]


def decode_chunk(buf: bytearray) -> PreparedChunk:
    """The inverse of :func:`encode_chunk` (arrays are views of ``buf``)."""
    n, outputs, ids_len = _CHUNK_HEAD.unpack_from(buf)
    at = _CHUNK_HEAD.size
    ends = np.frombuffer(buf, "<i8", n, at)
    at += 8 * n
    residues = np.frombuffer(buf, "<u4", n, at)
    at += 4 * n
    total = int(ends[-1]) if n else 0
    tokens = np.frombuffer(buf, "<i4", total, at)
    at += 4 * total
    digests = _sixteen_byte_items(buf, n, at)
    at += 16 * n
    truncated = np.frombuffer(buf, np.uint8, n, at)
    at += n
    keys = []
    for _ in range(outputs):
        keys.append(_sixteen_byte_items(buf, n, at))
        at += 16 * n
    ids = buf[at:at + ids_len].decode("utf-8").split("\n") if n else []
    if len(ids) != n or at + ids_len != len(buf):
        raise InternalError(f"input process sent a malformed chunk ({n} records, {len(ids)} ids, "
                            f"{len(buf)} bytes)")
    return PreparedChunk(ids, digests, residues, truncated, tokens, ends, tuple(keys))


def _sixteen_byte_items(buf: bytearray, n: int, at: int) -> list[bytes]:
    """``n`` 16-byte strings (digests, keys) from ``buf`` at ``at``, made by one numpy call
    (an opaque 16-byte item keeps its trailing zero bytes, unlike a numpy string)."""
    return np.frombuffer(buf, "V16", n, at).tolist()


# ----------------------------------------------------------------------------- readers


class ChunkReader(Protocol):
    """Where a run's prepared chunks come from: iterate :meth:`chunks` once (in the planner's
    thread), always :meth:`close` (any thread; ends a read in progress)."""

    def chunks(self) -> Iterator[PreparedChunk]: ...

    def close(self) -> None: ...


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


class InThreadInput:
    """Prepares the chunks in the thread that iterates them (the planner's), with the same
    :func:`prepare_chunk` the child process runs; stops reading at once (between two
    records) when ``stop`` is set or the reader is closed."""

    def __init__(self, records: Callable[[], Iterable[FastaRecord]], tokenizer,
                 max_residues: int | None, chunk_records: int,
                 stop: StopFlag | None = None, shard: Shard | None = None,
                 key_prefixes: Sequence[bytes] = ()) -> None:
        self._records, self._tokenizer = records, tokenizer
        self._key_prefixes = tuple(key_prefixes)
        self._max_residues, self._size = max_residues, read_chunk(chunk_records, shard)
        self._shard = shard
        self._stop = stop if stop is not None else threading.Event()
        self._closed = threading.Event()

    def chunks(self) -> Iterator[PreparedChunk]:
        stop, closed, size = self._stop, self._closed, self._size
        chunk: list[FastaRecord] = []
        for record in self._records():  # iterated here, in the reading thread
            if stop.is_set() or closed.is_set():
                return
            chunk.append(record)
            if len(chunk) >= size:
                prepared = prepare_chunk(chunk, self._tokenizer, self._max_residues, self._shard,
                                         self._key_prefixes)
                if prepared.ids:
                    yield prepared
                chunk = []
        if chunk and not (stop.is_set() or closed.is_set()):
            prepared = prepare_chunk(chunk, self._tokenizer, self._max_residues, self._shard,
                                     self._key_prefixes)
            if prepared.ids:
                yield prepared

    def close(self) -> None:
        self._closed.set()


def read_chunk(chunk_records: int, shard: Shard | None) -> int:
    """Records to read for one prepared chunk: ``chunk_records``, times N for a shard of N
    (so that a chunk still holds about ``chunk_records`` records), at most
    :data:`MAX_READ_CHUNK`."""
    if shard is None:
        return chunk_records
    return max(chunk_records, min(MAX_READ_CHUNK, chunk_records * shard.count))


def open_input(source: RecordSource, tokenizer, max_residues: int | None,
               process: bool | None, stop: StopFlag | None = None, *,
               processes: int | None = None, block_bytes: int | None = None,
               key_prefixes: Sequence[bytes] = ()) -> ChunkReader:
    """The reader of ``source``'s chunks: a child process when ``process`` is True (None: for
    FASTA input of at least :data:`INPUT_PROCESS_MIN_RECORDS` records) and the source is FASTA
    files and the child can rebuild ``tokenizer``; else in the planner's thread (which stops
    reading once ``stop`` is set). Children (``processes`` of them, None: by cores) are
    started now, so their start-up overlaps the engine's; ``block_bytes`` (None: the default)
    is the size of the blocks they are dealt. ``key_prefixes`` (one per output of the table):
    the chunks carry their records' embedding keys."""
    if process is None:
        process = source.count >= INPUT_PROCESS_MIN_RECORDS
    spec = tokenizer_spec(tokenizer)
    fasta = source.fasta
    if not process or fasta is None or spec is None:
        return InThreadInput(source.iterate, tokenizer, max_residues, LOOKUP_CHUNK, stop,
                             source.shard, key_prefixes)
    from gpuengine.input_workers import InputPool, process_count

    skip: dict[str, list[int]] = {}
    for name, index in fasta.report.skip:
        skip.setdefault(name, []).append(index)
    derive = None if source.derive is None else dataclasses.asdict(source.derive)
    return InputPool(fasta.paths, skip, fasta.alphabet, max_residues, spec, LOOKUP_CHUNK,
                     process_count(processes, heavy=spec["kind"] == "dna"), block_bytes,
                     source.shard, key_prefixes, derive)


def __getattr__(name: str):
    if name == "InputProcess":  # one child of the pool (gpuengine.input_workers)
        from gpuengine.input_workers import InputProcess

        return InputProcess
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- parent side


def tokenizer_spec(tokenizer) -> dict | None:
    """How the child rebuilds ``tokenizer``; None for one it cannot (then stay in-process)."""
    from gpuengine.tokenization import EsmTokenizer

    if type(tokenizer) is EsmTokenizer:
        return {"kind": "esm"}
    if type(tokenizer).__name__ == "DnaTokenizer" and getattr(tokenizer, "path", None):
        return {"kind": "dna", "path": os.fspath(tokenizer.path)}
    return None


def _make_tokenizer(spec: dict):
    if spec["kind"] == "esm":
        from gpuengine.tokenization import EsmTokenizer

        return EsmTokenizer()
    if spec["kind"] == "dna":
        from gpuengine.dna_tokenizer import DnaTokenizer

        return DnaTokenizer(spec["path"])
    raise InternalError(f"unknown tokenizer spec {spec!r}")


# ----------------------------------------------------------------------------- child side


def _serve(inp: BinaryIO, out: BinaryIO) -> None:
    from gpuengine.input_workers import serve  # an import error, too, reaches the engine

    serve(inp, out)


def main() -> int:
    """An input process (``python -m gpuengine.inputs``)."""
    return child_main(_serve)


if __name__ == "__main__":
    sys.exit(main())
