"""The store side of one run: which table it writes, what it checks first, how it ends.

Before anything expensive a run opens (or creates) its store (:class:`RunStore`) and checks
the table it will add to (:meth:`RunStore.check`): a table holding another compute precision
or another truncation is refused before the input is validated or any weight is read, and
the table's :class:`~gpuengine.store.lookup.TableLookup` is what the validation asks about ids
mapped to other sequences. Once the weights are read, :func:`table_spec` says what the table
holds (model identity, outputs, dtype, truncation, precision) and :func:`run_id` names the
run's progress record. A store the run created and left without a single record (it failed,
or was stopped while validating) is removed again by :meth:`RunStore.close`.

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
from gpuengine.errors import StoreMismatchError, UsageError
from gpuengine.models.registry import Family, Weights
from gpuengine.store.lookup import TableLookup
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
    """The store one run writes: opened (created when absent) by the constructor; always
    :meth:`close` it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.created = not self.path.exists()
        self.writer = StoreWriter(self.path)

    def check(self, table: str, precision: str, how: str,
              max_residues: int | None) -> TableLookup:
        """Refuse a compute precision (``how``: where it came from, for the message) or a
        truncation that differs from ``table``'s, before any weights are read; return the
        table's lookup (empty when the store has no such table yet)."""
        lookup = self.writer.lookup(table)
        stored = lookup.spec
        if stored is None:
            return lookup
        self.writer.check_precision(table, precision, how)
        if (stored.max_residues or None) != (max_residues or None):
            raise StoreMismatchError(
                f"store {self.writer.path} table {table!r} holds sequences truncated to "
                f"{stored.max_residues or 'none'} residues (max_residues); this run asks for "
                f"{max_residues or 'none'}; to keep both, add a new named table with --table "
                "NAME (or use another --out)")
        return lookup

    def begin_run(self, config: EmbedConfig, spec: TableSpec,
                  precision: str) -> tuple[str, dict[str, Any]]:
        """(run id, its progress record as this invocation found it): created, or reopened
        by a rerun; ``precision`` is the one the replicas compute in."""
        key = run_id(config, spec)
        info = {"command": "embed", "engine_version": __version__,
                "inputs": [str(p) for p in config.inputs], "precision": precision,
                "input_fingerprint": input_fingerprint(config.inputs)}
        if config.shard is not None:
            info["shard"] = config.shard.label
        started = self.writer.begin_run(key, info)
        return key, started

    def close(self, *, remove_if_empty: bool) -> None:
        """Release the store; with ``remove_if_empty``, remove it again when this run created
        it and it holds no record id (a failed run leaves nothing behind)."""
        try:
            empty = remove_if_empty and self.created and self.writer.is_empty()
        finally:
            self.writer.close()
        if empty:
            for name in ("data.mdb", "lock.mdb"):
                (self.path / name).unlink(missing_ok=True)
            try:
                self.path.rmdir()
            except OSError:
                pass
