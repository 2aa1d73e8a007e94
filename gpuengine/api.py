"""``gpuengine.embed``: embeddings straight into a notebook, no config object, no CLI.

    >>> import gpuengine
    >>> vectors = gpuengine.embed(["MKTAYIAKQR", "MSKGEELFTG"],                 # doctest: +SKIP
    ...                           model="esm2_t33_650M_UR50D")                    # (2, 1280)
    >>> by_id = gpuengine.embed("proteins.fasta", model="esm2_t33_650M_UR50D",   # doctest: +SKIP
    ...                         store="proteins.lmdb")                            # {id: (1280,)}

This module owns only the translation between Python values and one
:func:`~gpuengine.engine.run_embed` call: everything else — validation and its errors, model
resolution, packing, every device, deduplication, the store — is the engine's, exactly as for
``gpuengine embed``. In-memory sequences are written to a temporary FASTA file (one record per
line) so they pass through the same validation; its errors are re-worded to point at the
Python input (``sequences[3], position 17``) instead of the temporary file. Without ``store=``
the embeddings go to a temporary store that is deleted once read.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Union

from gpuengine.errors import EXIT_PARTIAL, GpuEngineError, InputError, UsageError
from gpuengine.vocabulary import DEFAULT_TABLE

__all__ = ["EmbeddingFailed", "embed"]

Sequences = Union[str, os.PathLike, Iterable[str], Iterable[tuple[str, str]], Mapping[str, str]]


class EmbeddingFailed(GpuEngineError):
    """Some sequences could not be embedded (e.g. a non-finite vector); the others are in the
    store when one was given. ``.failed`` lists (record id, reason)."""

    exit_code = EXIT_PARTIAL

    def __init__(self, message: str, failed: list[tuple[str, str]]):
        super().__init__(message)
        self.failed = failed


def embed(sequences: Sequences, *, model: str, store: str | os.PathLike | None = None,
          table: str = DEFAULT_TABLE, layers: int | Iterable[int] = -1,
          pool: str | Iterable[str] = "mean", precision: str | None = None,
          devices: str = "auto", max_tokens: int | None = None,
          max_residues: int | None = None, store_dtype: str = "float32",
          offline: bool = False, progress: bool = False) -> Any:
    """Embed protein (or, with a DNABERT-S model, DNA) sequences and return the vectors.

    Args:
        sequences: a list of sequence strings; ``(id, sequence)`` pairs, Biopython
            ``SeqRecord``s or a dict ``{id: sequence}``; or the path of a FASTA/FASTA.gz file
            (a ``str`` is taken as a path and must name an existing file).
        model: as ``gpuengine embed --model``: a published name (``esm2_t33_650M_UR50D``), a
            fair-esm ``.pt`` file or a Hugging Face directory.
        store: an LMDB store to embed into and read from: a later call finds what is stored
            and computes only what is missing (sequences given as a plain list are keyed by a
            hash of their text, so any list can share one store). Default: a temporary store,
            deleted before returning.
        table, layers, pool, precision, devices, max_tokens, store_dtype: as the ``embed``
            options ``--table``, ``--layers`` (an int or several; -1 = last), ``--pool``
            (``mean``, ``bos``, ``per-token``, or several), ``--precision``, ``--gpus``,
            ``--max-tokens``, ``--store-dtype``.
        max_residues: truncate longer sequences (None: the model's default, 1022 for ESM-2;
            0: never).
        offline: never download weights (also ``GPUENGINE_OFFLINE=1``).
        progress: show the progress bar on stderr.

    Returns:
        For a plain list: a NumPy array ``(N, d)`` in input order (per-token pooling: a list
        of ``(L, d)`` arrays). For pairs, records, a dict or a FASTA file: a dict
        ``{id: array}`` in input order. With several layers or pools: a dict
        ``{(layer, pool): <that>}`` keyed by the values as given.

    Raises:
        InputError: an invalid sequence (naming it, the position and the character), as the
            CLI stops on it; nothing is embedded. UsageError: a bad option. ModelLoadError,
            StoreError, StoreMismatchError: as ``gpuengine embed``. EmbeddingFailed: some
            sequences failed on the device. KeyboardInterrupt: interrupted (what was committed
            to ``store`` is kept; call again to finish).
    """
    from gpuengine.config import EmbedConfig
    from gpuengine.engine import run_embed

    source = _Input.of(sequences)
    layer_list = _as_tuple(layers, int, "layers")
    pool_list = _as_tuple(pool, str, "pool")
    residues = -1 if max_residues is None else (max_residues or None)
    with tempfile.TemporaryDirectory(prefix="gpuengine-embed-") as scratch:
        fasta = source.path or source.write(Path(scratch) / "sequences.fasta")
        out = Path(store) if store is not None else Path(scratch) / "embeddings.lmdb"
        config = EmbedConfig(inputs=(fasta,), model=str(model), out=out, layers=layer_list,
                             pools=pool_list, precision=precision, store_dtype=store_dtype,
                             max_residues=residues, table=table, devices=devices,
                             max_tokens=max_tokens, allow_download=not offline)
        try:
            with _stop_on_interrupt() as stop:
                summary = run_embed(config, _progress(progress), stop)
        except InputError as exc:
            if source.path is not None:
                raise
            raise source.explain(exc, str(fasta)) from None
        if summary.interrupted:
            raise KeyboardInterrupt("gpuengine.embed interrupted; what was committed "
                                    f"{'to ' + str(store) if store else ''} is kept")
        if summary.failed:
            first = summary.failed[0]
            raise EmbeddingFailed(f"{len(summary.failed)} sequences could not be embedded "
                                  f"(first: {source.describe_id(first[0])}: {first[1]})",
                                  [(source.describe_id(i), why) for i, why in summary.failed])
        results = {(layer, name): source.read(out, summary.table, layer, name)
                   for layer in layer_list for name in pool_list}
    return next(iter(results.values())) if len(results) == 1 else results


def _as_tuple(value, kind: type, name: str) -> tuple:
    values = (value,) if isinstance(value, kind) else tuple(value)
    if not values or not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise UsageError(f"{name}={value!r}: expected one {kind.__name__} or a list of them")
    return values


def _progress(enabled: bool):
    from gpuengine.progress import NullProgress

    if not enabled:
        return NullProgress()
    from gpuengine.display import RichProgress

    return RichProgress(enabled=True)


def _stop_on_interrupt():
    """Ctrl-C (a notebook's "interrupt kernel") sets the stop event: the run finishes the
    batches in flight, commits and returns interrupted. A second Ctrl-C raises at once."""
    from gpuengine.signals import StopOnSignals

    return StopOnSignals(signals=(signal.SIGINT,), on_second=_interrupt)


def _interrupt() -> None:
    raise KeyboardInterrupt


class _Input:
    """The caller's sequences: a FASTA path, or records held in memory with the ids they are
    stored under (``keyed`` when the caller gave the ids)."""

    def __init__(self, path: Path | None, ids: list[str], seqs: list[str], keyed: bool):
        self.path, self.ids, self.seqs, self.keyed = path, ids, seqs, keyed

    @classmethod
    def of(cls, sequences: Sequences) -> _Input:
        if isinstance(sequences, (str, os.PathLike)):
            path = Path(sequences)
            if not path.is_file():
                hint = (" (to embed one sequence, pass a list: embed([seq], ...))"
                        if isinstance(sequences, str) and os.sep not in sequences else "")
                raise InputError(f"FASTA file {sequences} not found{hint}")
            return cls(path, [], [], True)
        if isinstance(sequences, Mapping):
            return cls._records(list(sequences.items()))
        if isinstance(sequences, (bytes, bytearray)):
            raise UsageError("sequences must be str, not bytes")
        items = list(sequences)
        if not items:
            raise InputError("no sequences given")
        if all(isinstance(s, str) for s in items):
            return cls(None, [_content_id(s) for s in items], items, False)
        return cls._records(items)

    @classmethod
    def _records(cls, items: list) -> _Input:
        ids, seqs = [], []
        for n, item in enumerate(items):
            if hasattr(item, "id") and hasattr(item, "seq"):  # a Biopython SeqRecord
                rid, seq = item.id, str(item.seq)
            elif isinstance(item, tuple) and len(item) == 2:
                rid, seq = item
            else:
                raise UsageError(f"sequences[{n}] is a {type(item).__name__}: give sequence "
                                 "strings, (id, sequence) pairs, SeqRecords or a dict")
            if not isinstance(rid, str) or not isinstance(seq, str):
                raise UsageError(f"sequences[{n}]: the id and the sequence must be strings")
            if not rid or re.search(r"\s", rid):
                raise InputError(f"record {rid!r} (sequences[{n}]): an id must be non-empty "
                                 "and without whitespace (a FASTA id ends at the first space)")
            ids.append(rid)
            seqs.append(seq)
        return cls(None, ids, seqs, True)

    def write(self, path: Path) -> Path:
        """One header line and one sequence line per record; line breaks inside a sequence
        become spaces (removed by normalisation), so a column is a position in the string."""
        with open(path, "w", encoding="utf-8") as handle:
            for rid, seq in zip(self.ids, self.seqs):
                handle.write(f">{rid}\n{seq.replace(chr(13), ' ').replace(chr(10), ' ')}\n")
        return path

    def describe_id(self, rid: str) -> str:
        if self.keyed or self.path is not None:
            return repr(rid)
        return f"sequences[{self.ids.index(rid)}]"

    def _where(self, line: int) -> str:
        n = (line - 1) // 2  # record n: header on line 2n+1, sequence on line 2n+2
        return f"sequences[{n}]" if not self.keyed else f"record {self.ids[n]!r} (sequences[{n}])"

    def explain(self, exc: InputError, fasta: str) -> InputError:
        """The engine's error about the temporary FASTA, pointing at the Python input."""
        report = getattr(exc, "report", None)
        if report is None:
            return InputError(str(exc).replace(fasta, "<sequences>"))
        lines = [f"{report.problem_count} problem{'s' if report.problem_count != 1 else ''} "
                 f"in the {report.records} sequences given:"]
        for p in report.problems[:20]:
            text = f"  {self._where(p.line)}"
            text += f", position {p.column}" if p.column else ""
            text += f": {p.kind}"
            if p.character is not None:
                text += f" {p.character!r} (U+{ord(p.character):04X})"
            detail = re.sub(re.escape(fasta) + r":(\d+)", lambda m: self._where(int(m.group(1))),
                            p.detail)
            text += f": {detail}" if detail else ""
            lines.append(text)
        if report.problem_count > 20:
            lines.append(f"  ... and {report.problem_count - 20} more")
        lines.append("Fix these sequences; nothing was embedded.")
        error = InputError("\n".join(lines))
        error.report = report  # type: ignore[attr-defined]
        return error

    def read(self, store: Path, table: str, layer: int, pool: str) -> Any:
        from gpuengine.store.reader import EmbeddingStore

        with EmbeddingStore(store, table=table, layer=layer, pool=pool) as view:
            ids = self._ordered_ids()
            arrays = view.get_many(ids)
        if not self.keyed and self.path is None:
            return arrays
        return dict(zip(ids, arrays))

    def _ordered_ids(self) -> list[str]:
        """Plain list: one id per input row (repeats included); otherwise each id once."""
        if self.path is None:
            return self.ids if not self.keyed else list(dict.fromkeys(self.ids))
        from gpuengine.fasta import iter_records

        return list(dict.fromkeys(rec.id for rec, _ in iter_records(self.path, alphabet=None)))


def _content_id(sequence: str) -> str:
    """The id a plain-list sequence is stored under: a hash of its text, so a shared store
    never sees one id with two sequences."""
    return "seq-" + hashlib.blake2b(sequence.encode("utf-8"), digest_size=16).hexdigest()
