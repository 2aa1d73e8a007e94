"""The store side of one run: which table it writes, what it checks first, how it ends.

Before anything expensive a run opens (or creates) its store (:class:`RunStore`) and checks
the table it will add to (:meth:`RunStore.check`): a table holding another compute precision
or another truncation is refused before the input is validated or any weight is read, and
the table's :class:`~gpuengine.store.lookup.TableLookup` is what the validation asks about ids
mapped to other sequences. Once the weights are read, :func:`table_spec` says what the table
holds (model identity, outputs, dtype, truncation, precision) and :func:`run_id` names the
run's progress record. A store the run created and left without a single record (it failed,
or was stopped while validating) is removed again by :meth:`RunStore.close`.

A run of N writers (``--writers N``) writes N part stores in the directory OUT
(:mod:`gpuengine.store.parts`): the same table and run record in each part, the lookup over
all of them (:class:`~gpuengine.store.parts.PartsLookup`). A run not told writes one store
(parts only when asked: one file stays the default; the run's summary says when its writer set
the pace);
a rerun uses the number OUT records.

Nothing here touches a device or the run's threads.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from gpuengine import __version__
from gpuengine.config import EmbedConfig
from gpuengine.errors import InternalError, StoreMismatchError, UsageError
from gpuengine.models.registry import Family, Weights
from gpuengine.store.lookup import TableLookup
from gpuengine.store.parts import PartsLookup, part_label, part_paths, recorded_parts
from gpuengine.store.schema import ModelIdentity, OutputSpec, TableSpec
from gpuengine.store.writer import StoreWriter


def resolve_outputs(layers: tuple[int, ...], pools: tuple[str, ...],
                    num_layers: int) -> tuple[OutputSpec, ...]:
    """Negative layers count from the end (-1 = the last layer); 0 is the embedding layer."""
    resolved = []
    for layer in layers:
        index = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= index <= num_layers:
            raise UsageError(f"--layers {layer}: the model has layers 0..{num_layers} "
                             f"(or -{num_layers + 1}..-1)")
        resolved.append(index)
    if len(set(resolved)) != len(resolved):
        raise UsageError(f"--layers {layers} names the same layer twice")
    return tuple(OutputSpec(layer, pool) for layer in resolved for pool in pools)


def table_spec(config: EmbedConfig, fam: Family, weights: Weights, sha256: str,
               max_residues: int | None, precision: str) -> TableSpec:
    """What the run's table holds: ``config``'s outputs of the model ``weights`` (checksum
    ``sha256``), truncated to ``max_residues``, computed in ``precision``."""
    identity = ModelIdentity(family=fam.name, name=weights.source.name, sha256=sha256,
                             num_layers=weights.num_layers, embed_dim=weights.embed_dim,
                             attention_heads=weights.attention_heads,
                             vocab_size=weights.vocab_size)
    outputs = resolve_outputs(config.layers, config.pools, weights.num_layers)
    return TableSpec(name=config.table, model=identity, outputs=outputs,
                     store_dtype=config.store_dtype, dim=weights.embed_dim,
                     max_residues=max_residues, precision=precision)


def _input_stats(inputs) -> list[list[Any]]:
    parts: list[list[Any]] = []
    for path in inputs:
        stat = os.stat(path)
        parts.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    return parts


def input_fingerprint(inputs) -> str:
    """24 hex digits naming the input files as they are now: each one's absolute path, size
    and modification time (the shards of one cluster run all record the same one)."""
    return hashlib.blake2b(json.dumps(_input_stats(inputs)).encode(), digest_size=12).hexdigest()


def run_id(config: EmbedConfig, spec: TableSpec) -> str:
    """The key of the run's progress record: the table's spec, each input's path, size and
    modification time, and the shard (a rerun of the same files resumes the same record)."""
    parts: list[Any] = [spec.to_json(), *_input_stats(config.inputs)]
    if config.shard is not None:
        parts.append({"shard": config.shard.label})
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(),
                           digest_size=12).hexdigest()


class RunStore:
    """The store one run writes: one store at OUT, or N part stores in the directory OUT
    (``--writers N``, :mod:`gpuengine.store.parts`). The constructor opens what OUT already
    holds (its recorded number of parts), or creates a new OUT of ``writers`` stores (None:
    the number OUT holds, else 1). Always :meth:`close` it."""

    def __init__(self, path: str | os.PathLike[str], writers: int | None = 1) -> None:
        self.path = Path(path)
        self.recorded = recorded_parts(self.path)
        """The parts OUT held before this run (None: a new store)."""
        if writers is not None and self.recorded is not None and writers != self.recorded:
            raise UsageError(
                f"--writers {writers}: {self.path} was written by {self.recorded} writer"
                f"{'s' if self.recorded > 1 else ''} "
                f"({'one store' if self.recorded == 1 else f'{self.recorded} part stores'}); "
                f"a rerun keeps that number: leave --writers out (or give {self.recorded}), "
                "or use another --out")
        self.writers: list[StoreWriter] = []
        self._created: list[bool] = []
        """Per store opened, whether this run created it."""
        self.dir_created = False
        self._open(self.recorded or writers or 1)

    def _open(self, count: int) -> None:
        """Open (creating where absent) the ``count`` stores of OUT."""
        paths = part_paths(self.path, count)
        if count > 1 and not self.path.exists():
            self.path.mkdir(parents=True)
            self.dir_created = True
        try:
            for index, path in enumerate(paths):
                self._created.append(not path.exists())
                self.writers.append(StoreWriter(
                    path, part=None if count == 1 else part_label(index, count)))
        except BaseException:
            self.close(remove_if_empty=True)
            raise

    @property
    def created(self) -> bool:
        """Whether this run created a store it opened (a new OUT)."""
        return any(self._created)

    @property
    def count(self) -> int:
        """The stores written (1, or the parts in the directory OUT)."""
        return len(self.writers)

    @property
    def writer(self) -> StoreWriter:
        """The one store's writer (a run of one writer)."""
        if len(self.writers) != 1:
            raise InternalError(f"RunStore.writer of a store of {len(self.writers)} parts")
        return self.writers[0]

    def lookup(self, table: str) -> TableLookup | PartsLookup:
        """The table's read-only lookup over every store written."""
        if len(self.writers) == 1:
            return self.writers[0].lookup(table)
        return PartsLookup([w.lookup(table) for w in self.writers], self.path)

    def check(self, table: str, precision: str, how: str,
              max_residues: int | None) -> TableLookup | PartsLookup:
        """Refuse a compute precision (``how``: where it came from, for the message) or a
        truncation that differs from ``table``'s, before any weights are read; return the
        table's lookup (empty when the store has no such table yet)."""
        for writer in self.writers:
            stored = writer.stored_spec(table)
            if stored is None:
                continue
            writer.check_precision(table, precision, how)
            if (stored.max_residues or None) != (max_residues or None):
                raise StoreMismatchError(
                    f"store {writer.path} table {table!r} holds sequences truncated to "
                    f"{stored.max_residues or 'none'} residues (max_residues); this run asks "
                    f"for {max_residues or 'none'}; to keep both, add a new named table with "
                    "--table NAME (or use another --out)")
        return self.lookup(table)

    def open_table(self, spec: TableSpec) -> None:
        for writer in self.writers:
            writer.open_table(spec)

    def begin_run(self, config: EmbedConfig, spec: TableSpec, precision: str, *,
                  fidelity: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """(run id, its progress record as this invocation found it): created, or reopened
        by a rerun, in every store written (each part's record counts that part's commits;
        ``info.part`` says which part); ``precision`` is the one the replicas compute in,
        ``fidelity`` the guard's measurement of a lossy one (``info.fidelity``). The record
        returned is the first part's, its counters summed over the parts."""
        key = run_id(config, spec)
        info: dict[str, Any] = {"command": "embed", "engine_version": __version__,
                                "inputs": [str(p) for p in config.inputs],
                                "precision": precision,
                                "input_fingerprint": input_fingerprint(config.inputs)}
        if config.shard is not None:
            info["shard"] = config.shard.label
        if fidelity is not None:
            info["fidelity"] = fidelity
        records = []
        for index, writer in enumerate(self.writers):
            if len(self.writers) > 1:
                info = {**info, "part": part_label(index, len(self.writers))}
            records.append(writer.begin_run(key, info))
        started = dict(records[0])
        for name in ("committed_sequences", "committed_records"):
            started[name] = sum(int(r.get(name, 0)) for r in records)
        return key, started

    def finish_run(self, key: str, status: str, summary: dict[str, Any]) -> None:
        """The run's final status and summary, in every store written."""
        for writer in self.writers:
            writer.finish_run(key, status, summary)

    def close(self, *, remove_if_empty: bool) -> None:
        """Release the stores; with ``remove_if_empty``, remove again each one this run
        created that holds no record id (a failed run leaves nothing behind), and the
        directory of parts it created once empty."""
        empty = []
        for writer, created in zip(self.writers, self._created):
            try:
                empty.append(remove_if_empty and created and writer.is_empty())
            finally:
                writer.close()
        for writer, gone in zip(self.writers, empty):
            if gone:
                path = Path(writer.path)
                for name in ("data.mdb", "lock.mdb"):
                    (path / name).unlink(missing_ok=True)
                try:
                    path.rmdir()
                except OSError:
                    pass
        if self.dir_created and remove_if_empty and all(empty):
            try:
                self.path.rmdir()
            except OSError:
                pass
        self.writers, self._created = [], []
