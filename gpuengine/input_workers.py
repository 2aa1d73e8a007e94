"""Input processes: the valid records of FASTA/FASTQ files read, hashed and tokenized by
several child processes at once, delivered to the planner in input order.

* A **feeder** thread in the engine reads each file as record-aligned blocks
  (:func:`gpuengine.blocks.read_blocks`: a few C-level calls per half megabyte, the GIL
  released while reading and decompressing) and deals them out in turn: block *b* goes to
  child *b mod N*.
* Each **child** (:class:`InputProcess`, ``python -m gpuengine.inputs``) parses its blocks
  (:func:`gpuengine.blocks.parse_block`: the records the first pass did not skip, problems
  re-read the first pass's exact way), truncates, hashes and tokenizes them
  (:func:`gpuengine.inputs.prepare_lists`) and writes ``CHNK`` frames, then ``BEND`` for each
  block.
* The **planner** thread (:meth:`InputPool.chunks`) reads the children in the same turn, a
  block's chunks up to its ``BEND``, so chunks come in input order whatever the number of
  children: resume, deduplication and the store are as with one reader.

Nothing crosses as pickle (frames as in :mod:`gpuengine.inputs`). Parent → child: ``CONF``,
one ``SKIP`` per file, then ``BLCK`` frames (:func:`gpuengine.blocks.block_frame`);
closing the child's stdin ends its input (it answers ``DONE``). The order of the children
cannot deadlock: the planner always waits on the earliest block not yet read, which the
feeder has already sent, and whose child has nothing earlier left to write.

A child ignores SIGINT and SIGTERM and runs in its own session; if the engine dies, its next
read or write fails and it exits.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from gpuengine.blocks import (BLOCK_BYTES, Block, block_frame, block_from, parse_block,
                              read_blocks)
from gpuengine.errors import GpuEngineError, InputError, InternalError
from gpuengine.pipe_frames import (GPUENGINE_ERRORS, close_pipes, error_from, how_it_ended,
                                   read_frame, start_child, write_all, write_frame)
from gpuengine.shards import Shard

def process_count(choice: int | None = None, *, heavy: bool = True) -> int:
    """Input processes to start: ``choice`` (``GPUENGINE_INPUT_PROCESSES``, read by
    :mod:`gpuengine.config`), else by the cores this process may run on, keeping two for the
    engine's own threads (planner, committer, devices, feeder):

    * a ``heavy`` tokenizer (DNABERT-S's BPE, about 50 µs a 150-bp read on one core): the
      cores less two, but as many as the cores up to two, at most 16 (2, 2, 6, 14 for 2, 4,
      8, 16 cores); on the 2-core machine two children tokenize 2.4 times the reads per
      second of the one child before, though the engine shares their cores;
    * a light one (ESM-2's table lookup): the cores less two, at least 1, at most 4 (1, 2, 4,
      4): a few children outrun the engine, and on a small machine more of them would only
      take its cores.
    """
    if choice:
        return choice
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if heavy:
        return min(16, max(cores - 2, min(cores, 2)))
    return min(4, max(1, cores - 2))


# ----------------------------------------------------------------------------- parent side


class InputProcess:
    """One child process preparing the blocks it is sent. :meth:`send` blocks, :meth:`end_input`
    when there are no more; read its answers with :meth:`block_chunks`; always :meth:`close`
    it (kills and reaps the child, whatever state it is in)."""

    command = [sys.executable, "-m", "gpuengine.inputs"]

    def __init__(self, paths: Sequence[str | os.PathLike], skip: dict[str, Sequence[int]],
                 alphabet: frozenset[str] | None, max_residues: int | None,
                 tokenizer: dict, chunk_records: int, shard: Shard | None = None,
                 key_prefixes: Sequence[bytes] = (), derive: dict | None = None) -> None:
        from gpuengine.fasta import _name

        names = [_name(p) for p in paths]
        conf = {"paths": [os.fsdecode(os.fspath(p)) for p in paths], "names": names,
                "alphabet": None if alphabet is None else "".join(sorted(alphabet)),
                "max_residues": max_residues, "tokenizer": tokenizer,
                "chunk_records": chunk_records,
                "shard": None if shard is None else [shard.index, shard.count],
                "key_prefixes": [bytes(p).hex() for p in key_prefixes],
                "derive": derive}
        self._closing = False
        self._lock = threading.Lock()
        self.proc = start_child(self.command)
        try:
            write_frame(self.proc.stdin, b"CONF", json.dumps(conf).encode("utf-8"))
            for name in names:
                indices = np.asarray(sorted(skip.get(name, ())), dtype="<u8")
                write_frame(self.proc.stdin, b"SKIP", indices.tobytes())
        except BrokenPipeError:
            self.end_input()  # the child died at once: block_chunks() reports how
        except BaseException:  # nobody holds this object yet to close it: reap the child now
            self.close()
            raise

    def send(self, block: Block) -> None:
        """Hand the child a block (waits while its pipe is full). Raises OSError (a broken
        pipe) when the child is gone."""
        write_all(self.proc.stdin.fileno(), block_frame(block))

    def end_input(self) -> None:
        """No more blocks: the child answers ``DONE`` after the ones it has."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def block_chunks(self) -> Iterator:
        """The prepared chunks of the child's next block, up to its ``BEND``; returns quietly
        at ``DONE`` (no block left), with :attr:`done` set. Raises the child's error, or an
        InputError naming its exit status when it died without finishing."""
        from gpuengine.inputs import decode_chunk

        self.done = False
        while True:
            try:
                frame = read_frame(self.proc.stdout)
            except (EOFError, OSError, ValueError):
                frame = None
            if frame is None:
                if self._closing:
                    self.done = True
                    return
                raise self._died()
            tag, payload = frame
            if tag == b"CHNK":
                yield decode_chunk(payload)
            elif tag == b"BEND":
                return
            elif tag == b"DONE":
                self.done = True
                return
            elif tag == b"FAIL":
                raise error_from(payload, GPUENGINE_ERRORS, "input reader process")
            else:
                raise InternalError(f"input process sent an unknown frame {tag!r}")

    def _died(self) -> GpuEngineError:
        how = how_it_ended(self.proc, "is still running")
        return InputError(f"the input reader process (pid {self.proc.pid}) {how} before the end "
                          "of the input; what was committed is intact, rerun to resume")

    def close(self) -> None:
        """Kill (if still running) and reap the child; idempotent."""
        with self._lock:
            self._closing = True
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            close_pipes(self.proc)

    def __enter__(self) -> InputProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InputPool:
    """``processes`` children fed record-aligned blocks of ``paths`` in turn by a feeder
    thread; :meth:`chunks` yields their prepared chunks in input order (a
    :class:`~gpuengine.inputs.ChunkReader`). Children and the feeder start at once (their
    start-up overlaps the engine's); always :meth:`close` it."""

    def __init__(self, paths: Sequence[str | os.PathLike], skip: dict[str, Sequence[int]],
                 alphabet: frozenset[str] | None, max_residues: int | None, tokenizer: dict,
                 chunk_records: int, processes: int, block_size: int | None = None,
                 shard: Shard | None = None, key_prefixes: Sequence[bytes] = (),
                 derive: dict | None = None) -> None:
        self.paths = list(paths)
        self.block_size = block_size or BLOCK_BYTES
        self.children: list[InputProcess] = []
        self._closing = threading.Event()
        self._error: BaseException | None = None
        try:
            for _ in range(processes):
                self.children.append(InputProcess(paths, skip, alphabet, max_residues,
                                                  tokenizer, chunk_records, shard,
                                                  key_prefixes, derive))
        except BaseException:
            self.close()
            raise
        self._feeder = threading.Thread(target=self._feed, name="gpuengine-input-feeder",
                                        daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        children, n, b = self.children, len(self.children), 0
        try:
            for number, path in enumerate(self.paths):
                for block in read_blocks(path, number, self.block_size):
                    if self._closing.is_set():
                        return
                    children[b % n].send(block)
                    b += 1
        except OSError as exc:
            if not isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                self._error = exc  # a child gone: the reader meets its death in order
        except BaseException as exc:  # noqa: BLE001 - raised in input order by chunks()
            self._error = exc
        finally:
            for child in children:
                child.end_input()

    def chunks(self) -> Iterator:
        """Prepared chunks in input order; raises a child's error, or the feeder's (a file
        that cannot be read any more) where its input ends."""
        children, n, b = self.children, len(self.children), 0
        while True:
            child = children[b % n]
            yield from child.block_chunks()
            if child.done:  # no block b: the input ended (or the feeder stopped) before it
                self._feeder.join()
                if self._error is not None and not self._closing.is_set():
                    error = self._error
                    if not isinstance(error, GpuEngineError):
                        error = InputError(f"reading the input failed: {error}")
                    raise error
                return
            b += 1

    def close(self) -> None:
        """Stop the feeder, kill and reap every child; idempotent."""
        self._closing.set()
        for child in self.children:
            child.close()
        feeder = getattr(self, "_feeder", None)
        if feeder is not None:
            feeder.join()

    def __enter__(self) -> InputPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- child side


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """The child's loop: configuration and skip lists, then each block's chunks and ``BEND``;
    ``DONE`` when the engine closes the input."""
    from gpuengine import inputs

    frame = read_frame(inp)
    if frame is None or frame[0] != b"CONF":
        raise InternalError("input process: no configuration received")
    conf = json.loads(bytes(frame[1]).decode("utf-8"))
    skips = []
    for _ in conf["names"]:
        frame = read_frame(inp)
        if frame is None or frame[0] != b"SKIP":
            raise InternalError("input process: skip list missing")
        skips.append(np.frombuffer(frame[1], "<u8"))
    tokenizer = inputs._make_tokenizer(conf["tokenizer"])
    alphabet = None if conf["alphabet"] is None else frozenset(conf["alphabet"])
    shard = None if conf.get("shard") is None else Shard(*conf["shard"])
    max_residues, names = conf["max_residues"], conf["names"]
    prefixes = [bytes.fromhex(p) for p in conf.get("key_prefixes", ())]
    derive = inputs.derive_function(conf.get("derive"))
    size = inputs.read_chunk(conf["chunk_records"], shard)  # a shard keeps 1/N of them
    while (frame := read_frame(inp)) is not None:
        tag, payload = frame
        if tag != b"BLCK":
            raise InternalError(f"input process: unexpected frame {bytes(tag)!r}")
        block = block_from(payload)
        skip, first = skips[block.file], block.first_index
        lo, hi = np.searchsorted(skip, [first, first + block.count])
        ids, seqs = parse_block(block, names[block.file], alphabet, skip[lo:hi].tolist())
        if derive is not None:  # the block's records become the ones derived from them
            ids, seqs = derive(ids, [s.decode("utf-8") for s in seqs])
        for at in range(0, len(ids), size):
            text = seqs[at:at + size]
            if derive is None:
                text = [s.decode("utf-8") for s in text]
            chunk = inputs.prepare_lists(ids[at:at + size], text, tokenizer, max_residues, shard,
                                         prefixes)
            if chunk.ids:
                out.writelines(inputs.encode_chunk(chunk))
        write_frame(out, b"BEND", b"")
        out.flush()
    write_frame(out, b"DONE", b"")
    out.flush()
