"""The store commands of ``gpuengine``: ``lookup``, ``info``, ``export`` and ``merge`` read
and combine stores; they load no model and import no torch (a store opens at once).

They are declared on :data:`commands`, a holder the main app (:mod:`gpuengine.cli`) takes
them from, in their place between ``predict`` and ``devices`` in ``gpuengine --help``. Each
parses, makes one call into the store package or :mod:`gpuengine.export`, and turns a
:class:`~gpuengine.errors.GpuEngineError` into its exit code (:func:`~gpuengine.cli_options.fail`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from gpuengine.cli_options import JsonSummary, PrintJson, Quiet, StoresArgument, Verbose, fail
from gpuengine.errors import GpuEngineError, UsageError

commands = typer.Typer()
"""Holds the store commands until :mod:`gpuengine.cli` adds them to its app."""


def _message(exc: Exception) -> str:
    """An exception's text; a KeyError's str() is the repr of its message, so take the message."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


@commands.command(epilog="Examples: gpuengine lookup proteins.lmdb P12345 Q67890 --json;  "
                         "gpuengine lookup out/shards P12345")
def lookup(
    store: Annotated[Path, typer.Argument(
        help="An LMDB store written by gpuengine embed, or a directory of stores (such as "
        "out/shards/) read as one.")],
    ids: Annotated[List[str], typer.Argument(
        help="Record ids (the FASTA header up to the first space).")],
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per id on stdout.")] = False,
    table: Annotated[Optional[str], typer.Option(
        "--table", help="Table to read. \\[default: the only one, or 'default']")] = None,
    layer: Annotated[Optional[int], typer.Option(
        "--layer", help="Layer of the output to read.")] = None,
    pool: Annotated[Optional[str], typer.Option(
        "--pool", help="Pooling of the output to read.")] = None,
) -> None:
    """Print stored embeddings of record ids (tab-separated values, or JSON lines)."""
    from gpuengine.store.reader import EmbeddingStore

    missing = []
    try:
        with EmbeddingStore(store, table=table, layer=layer, pool=pool) as emb:
            for record_id in ids:
                vector = emb.get(record_id)
                if vector is None:
                    missing.append(record_id)
                    continue
                if as_json:
                    typer.echo(json.dumps({"id": record_id, "layer": emb.output.layer,
                                           "pool": emb.output.pool, "shape": list(vector.shape),
                                           "embedding": vector.astype(float).tolist()}))
                else:
                    rows = vector.reshape(-1, vector.shape[-1])
                    for row in rows:  # str of a numpy scalar: shortest text that reads back exactly
                        typer.echo(record_id + "\t" + "\t".join(map(str, row)))
    except (GpuEngineError, KeyError, ValueError) as exc:
        raise fail(exc if isinstance(exc, GpuEngineError) else UsageError(_message(exc))) from None
    if missing:
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise fail(GpuEngineError(f"not in {store}: {', '.join(missing[:20])}{more}"))


@commands.command(epilog="Examples: gpuengine info proteins.lmdb --json;  gpuengine info "
                         "out/shards;  gpuengine info a.lmdb b.lmdb")
def info(stores: StoresArgument,
         table: Annotated[Optional[str], typer.Option(
             "--table", help="Describe only this table. \\[default: every table]")] = None,
         as_json: PrintJson = False) -> None:
    """Describe a store: schema, tables (model, layers, pooling, dtype), counts, size."""
    from gpuengine.store.reader import store_info
    from gpuengine.store.sources import expand_stores

    try:
        several = stores if len(stores) > 1 else expand_stores(stores[0])
        if several:
            from gpuengine.store.multi import stores_info

            data = stores_info(several, table=table)
        else:
            data = store_info(stores[0], table=table)
    except GpuEngineError as exc:
        raise fail(exc) from None
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    from gpuengine.display import format_info

    typer.echo(format_info(data))


@commands.command(epilog="Examples: gpuengine export proteins.lmdb --format npz -o "
                         "proteins.npz;  gpuengine export proteins.lmdb --format hdf5 -o "
                         "reduced_embeddings_file.h5;  gpuengine export proteins.lmdb --format "
                         "fair-esm -o esm_out/;  gpuengine export out/shards -o all.npz")
def export(
    stores: StoresArgument,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="File to write (a directory for fair-esm).")],
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="npz (ids, embeddings matrix), tsv, hdf5 (one dataset per id, "
        "as bio_embeddings and ProtTrans write; needs h5py) or fair-esm (one <id>.pt per "
        "record, as fair-esm's extract.py writes).")] = "npz",
    table: Annotated[Optional[str], typer.Option(
        "--table", help="Table to export. \\[default: the only one, or 'default']")] = None,
    layer: Annotated[Optional[int], typer.Option(
        "--layer", help="Layer of the output to export.")] = None,
    pool: Annotated[Optional[str], typer.Option(
        "--pool", help="Pooling of the output to export. "
        "\\[default: the table's first output; fair-esm: all]")] = None,
) -> None:
    """Export a table's embeddings for other tools: NumPy, TSV, HDF5 or fair-esm .pt files."""
    from gpuengine.export import export_store

    try:
        done = export_store(stores[0] if len(stores) == 1 else stores, output, fmt,
                            table=table, layer=layer, pool=pool)
    except GpuEngineError as exc:
        raise fail(exc) from None
    from gpuengine.display import stderr

    stderr.print(f"exported {done.count:,} embeddings (table {done.table}, "
                 f"{', '.join(done.outputs)}) to {output}", markup=False, highlight=False)


@commands.command(epilog="Examples: gpuengine merge all.lmdb out/shards;  gpuengine merge "
                         "all.lmdb a.lmdb b.lmdb c.lmdb --verify;  gpuengine merge proteins.lmdb "
                         "new.lmdb --json > merge.json")
def merge(
    out: Annotated[Path, typer.Argument(
        help="The merged store: created, or added to when it exists.", show_default=False)],
    stores: Annotated[List[Path], typer.Argument(
        help="Stores to merge, or directories of stores (such as out/shards/), in order: the "
        "first copy of an id or vector is kept.", show_default=False)],
    verify: Annotated[bool, typer.Option(
        "--verify", help="Afterwards, read every vector and id of every input again and "
        "compare it with OUT (exit 1 on any difference).")] = False,
    transaction_mb: Annotated[float, typer.Option(
        "--transaction-mb", help="Vector MiB per write transaction: fewer, larger commits are "
        "faster; a kill loses at most one.")] = 256.0,
    json_summary: JsonSummary = False,
    quiet: Quiet = False,
    verbose: Verbose = 0,
) -> None:
    """Merge stores (the shards of a cluster run, or any stores of the same model and
    options) into one. Exactly once and restartable: after a kill, run the same command."""
    from gpuengine.display import MergeBar, announce_stop, print_merge_summary, setup_logging
    from gpuengine.signals import StopOnSignals
    from gpuengine.store.merge import merge_stores

    setup_logging(verbose, quiet)
    bar = MergeBar(enabled=not quiet)
    try:
        if not transaction_mb > 0:
            raise UsageError(f"--transaction-mb {transaction_mb}: expected a positive size")
        with StopOnSignals(on_stop=announce_stop) as stop:
            summary = merge_stores(out, stores, verify=verify, progress=bar, stop=stop,
                                   transaction_bytes=max(1, int(transaction_mb * (1 << 20))))
    except GpuEngineError as exc:
        bar.close()
        raise fail(exc) from None
    bar.close()
    if not quiet:
        print_merge_summary(summary)
    if json_summary:
        typer.echo(json.dumps(summary.to_json(), indent=2, default=str))
    raise typer.Exit(summary.exit_code)
