"""The ``gpuengine`` command line. Each command parses, builds a config and makes one call.

Heavy imports (torch, the models) happen inside the commands so that ``--help`` is instant.
Exit codes: 0 ok, 1 error, 2 usage, 3 partial (some sequences failed), 4 refused (a lossy
precision below its fidelity threshold), 130 interrupted.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

import typer

from gpuengine import __version__
from gpuengine.errors import EXIT_INTERRUPTED, GpuEngineError, UsageError

HELP = """Exact, packed protein (ESM-2) and DNA (DNABERT-S) embeddings on every GPU, into LMDB.

[bold]Examples[/bold]

  gpuengine embed proteins.fasta.gz --model esm2_t33_650M_UR50D --out proteins.lmdb
  gpuengine embed a.fa b.fa.gz -m esm2_t36_3B_UR50D.pt -o store.lmdb --layers 20,-1 --pool mean,bos
  gpuengine lookup proteins.lmdb P12345 --json
  gpuengine info proteins.lmdb
  gpuengine merge all.lmdb out/shards --verify        (or: gpuengine merge all.lmdb a.lmdb b.lmdb)
  gpuengine export proteins.lmdb --format npz -o proteins.npz
  gpuengine export proteins.lmdb --format hdf5 -o embeddings.h5   (or fair-esm -o esm_out/)
  gpuengine predict reads.fasta --length 500 --classifier 500_model.pth
  gpuengine serve --watch /srv/embed --store /srv/embed/store.lmdb --model esm2_t33_650M_UR50D
  gpuengine status /srv/embed
  gpuengine devices --model esm2_t36_3B_UR50D
  gpuengine check proteins.fasta --model esm2_t36_3B_UR50D --precision fp16,fp8

Exit codes: 0 ok, 1 error, 2 usage, 3 partial (some sequences failed), 4 refused (fp8 below
--fp8-min-cosine), 130 interrupted.
"""


def _untyped_flags(command, ctx) -> None:
    """On/off flags and counters (-v -v) take no value: show no type for them in --help
    (typer's rich help would show ``<bool>``/``<int>``)."""
    for param in command.get_params(ctx):
        if getattr(param, "count", False):
            param.show_default = False  # "[default: 0]" says nothing
        if (getattr(param, "is_flag", False) or getattr(param, "count", False)) \
                and param.metavar is None:
            param.metavar = ""


class _Command(typer.core.TyperCommand):
    def format_help(self, ctx, formatter):
        _untyped_flags(self, ctx)
        return super().format_help(ctx, formatter)


class _Group(typer.core.TyperGroup):
    def format_help(self, ctx, formatter):
        _untyped_flags(self, ctx)
        return super().format_help(ctx, formatter)


app = typer.Typer(help=HELP, rich_markup_mode="rich", no_args_is_help=True, add_completion=False,
                  context_settings={"help_option_names": ["-h", "--help"]}, cls=_Group)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gpuengine {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Optional[bool] = typer.Option(None, "--version", callback=_version,
                                                  is_eager=True, help="Print the version and exit.")) -> None:
    """Exact, packed protein (ESM-2) and DNA (DNABERT-S) embeddings on every GPU, into LMDB."""


def _fail(exc: GpuEngineError) -> typer.Exit:
    from rich.text import Text

    from gpuengine.display import stderr

    # The message holds user data (paths, record ids, file contents): print it as plain text,
    # never as console markup ("[/]" in an id would crash rich, "[bold]" would vanish).
    stderr.print(Text.assemble(("error:", "bold red"), " ", str(exc)), highlight=False,
                 soft_wrap=True)
    return typer.Exit(exc.exit_code)


def _message(exc: Exception) -> str:
    """An exception's text; a KeyError's str() is the repr of its message, so take the message."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        return exc.args[0]
    return str(exc)


def _split(values: List[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


@app.command(epilog="Example: gpuengine embed proteins.fasta.gz --model esm2_t33_650M_UR50D "
                    "--out proteins.lmdb")
def embed(
    inputs: List[Path] = typer.Argument(..., help="FASTA files (plain or gzip).", show_default=False),
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint file (esm2_*.pt), Hugging "
                              "Face directory, or published name such as esm2_t33_650M_UR50D."),
    out: Path = typer.Option(..., "--out", "-o", help="LMDB store (directory); resumed if it exists."),
    layers: str = typer.Option("-1", "--layers", help="Comma-separated layers; negative counts "
                               "from the end (-1 = last, final-LayerNorm output). Use --layers=-1."),
    pool: List[str] = typer.Option(["mean"], "--pool", help="mean, bos, per-token (repeat or "
                                   "comma-separate for several)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16, bf16 or fp8 "
                                            "(ESM-2 on GPUs of compute capability >= 8.9; lossy: "
                                            "measured first, see --fp8-min-cosine). "
                                            "\\[default: fp32 on CPU, fp16 on GPU]"),
    fp8_min_cosine: float = typer.Option(0.99, "--fp8-min-cosine", help="With --precision fp8: "
                                         "refuse the run (exit 4) when a sample of the input "
                                         "embedded at fp8 has a cosine to fp16 below this."),
    store_dtype: str = typer.Option("float32", "--store-dtype", help="float32 or float16."),
    max_residues: Optional[int] = typer.Option(None, "--max-residues", help="Truncate longer "
                                               "sequences to this many residues (0: never). "
                                               "\\[default: 1022 for ESM-2, as fair-esm's "
                                               "extract.py; none for DNA models]",
                                               show_default=False),
    table: str = typer.Option("default", "--table", help="Named table in the store; a new name "
                              "adds another model/layer/pooling to an existing store."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip invalid records "
                                      "(counted) instead of stopping before the model loads."),
    gpus: str = typer.Option("auto", "--gpus", help="auto, all, cpu, or ordinals like 0,1."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Upper bound on tokens "
                                             "per batch. \\[default: from device memory]"),
    offline: bool = typer.Option(False, "--offline", help="Never download weights."),
    json_summary: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; warnings only."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging."),
) -> None:
    """Embed FASTA records into an LMDB store (resumable; identical sequences computed once)."""
    from gpuengine.config import EmbedConfig
    from gpuengine.display import RichProgress, print_summary, setup_logging

    setup_logging(verbose, quiet)
    try:
        _check_table(table)
        config = EmbedConfig(
            inputs=tuple(inputs), model=model, out=out, layers=_parse_layers(layers),
            pools=tuple(_split(pool)), precision=precision, store_dtype=store_dtype,
            max_residues=-1 if max_residues is None else (max_residues or None), table=table, skip_invalid=skip_invalid,
            devices=gpus, max_tokens=max_tokens, allow_download=not offline,
            fp8_min_cosine=fp8_min_cosine)
        from gpuengine.engine import run_embed

        with _stop_on_signals() as stop:
            summary = run_embed(config, RichProgress(enabled=not quiet), stop)
    except GpuEngineError as exc:
        raise _fail(exc) from None
    if not quiet:
        print_summary(summary)
    if json_summary:
        typer.echo(json.dumps(summary.to_json(), indent=2))
    raise typer.Exit(summary.exit_code)


def _check_table(name: str) -> None:
    """Refuse a bad --table before any work (the store's schema would raise a bare ValueError
    only after the weights are read)."""
    from gpuengine.store.schema import _TABLE_NAME

    if not _TABLE_NAME.fullmatch(name):
        raise UsageError(f"--table {name!r}: a table name is 1-64 characters of letters, digits, "
                         "'_', '.' and '-'")


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _split([text]))
    except ValueError:
        raise UsageError(f"--layers {text!r}: expected comma-separated integers like 33 or -1") from None


class _stop_on_signals:
    """SIGINT/SIGTERM set a stop event (drain, commit, exit 130); a second one exits at once."""

    def __enter__(self) -> threading.Event:
        self.stop = threading.Event()
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test runner)
                pass
        return self.stop

    def _handle(self, signum, frame) -> None:
        if self.stop.is_set():
            import os

            os._exit(EXIT_INTERRUPTED)
        from gpuengine.display import stderr

        stderr.print("[yellow]stopping[/yellow]: finishing batches in flight and committing "
                     "(press Ctrl-C again to quit at once)")
        self.stop.set()

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@app.command(epilog="Examples: gpuengine predict reads.fasta --length 500 --classifier "
                    "500_model.pth;  gpuengine predict reads.fasta 500 500_model.pth")
def predict(
    args: List[str] = typer.Argument(..., help="reads.fasta [LENGTH CLASSIFIER] (the original "
                                     "tool's positional form is accepted).", show_default=False),
    length: Optional[int] = typer.Option(None, "--length", "-l", help="Expected chunk length: "
                                         "300 or 500, matching the classifier."),
    classifier: Optional[Path] = typer.Option(None, "--classifier", "-c", help="The MLP: the "
                                              "published 300_model.pth/500_model.pth (read without "
                                              "running code), a state dict or safetensors."),
    esm_model: str = typer.Option("esm2_t36_3B_UR50D", "--esm-model", help="The ESM-2 "
                                  "(checkpoint, directory or published name)."),
    esm_layer: int = typer.Option(-1, "--esm-layer", help="ESM-2 layer (-1: last, 36 for 3B)."),
    dnabert_model: str = typer.Option("zhihan1996/DNABERT-S", "--dnabert-model",
                                      help="The DNABERT-S (directory, or the hub name from the "
                                      "local Hugging Face cache)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder. "
                                       "\\[default: <input base>_merged/ next to the input]"),
    store: Optional[Path] = typer.Option(None, "--store", help="Embedding store. "
                                         "\\[default: <out>/embeddings.lmdb]"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16, bf16 or fp8 "
                                            "(fp8: the ESM-2 stage, guarded; DNABERT-S stays "
                                            "fp16). \\[default: fp32 on CPU, fp16 on GPU]"),
    gpus: str = typer.Option("auto", "--gpus", help="auto, all, cpu, or ordinals like 0,1."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Upper bound on tokens "
                                             "per batch. \\[default: from device memory]"),
    keep_intermediate: bool = typer.Option(False, "--keep-intermediate", help="Also write the "
                                           "chunked reads and the identified nucleotide/protein "
                                           "FASTA files."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip invalid reads "
                                      "(counted) instead of stopping before the models load."),
    offline: bool = typer.Option(False, "--offline", help="Never download weights."),
    json_summary: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; warnings only."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging."),
) -> None:
    """VirNucPro viral-read prediction: per-frame scores, per-chunk and per-read calls."""
    from dataclasses import asdict

    from gpuengine.display import RichProgress, setup_logging

    setup_logging(verbose, quiet)
    try:
        if len(args) == 3 and length is None and classifier is None:
            args, length, classifier = args[:1], _positional_length(args[1]), Path(args[2])
        if len(args) != 1 or length is None or classifier is None:
            raise UsageError("give reads.fasta with --length and --classifier (or the original "
                             "form: reads.fasta LENGTH CLASSIFIER)")
        from gpuengine.workflows.virnucpro.pipeline import PredictConfig, run_predict

        config = PredictConfig(reads=Path(args[0]), length=length, classifier=classifier,
                               esm_model=esm_model, esm_layer=esm_layer,
                               dnabert_model=dnabert_model, out=out, store=store,
                               precision=precision, devices=gpus, max_tokens=max_tokens,
                               keep_intermediate=keep_intermediate, skip_invalid=skip_invalid,
                               allow_download=not offline)
        with _stop_on_signals() as stop:
            summary = run_predict(config, RichProgress(enabled=not quiet), stop)
    except GpuEngineError as exc:
        raise _fail(exc) from None
    from gpuengine.display import stderr

    if not quiet:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in summary.stage_seconds.items())
        stderr.print(f"predict: {summary.reads:,} reads, {summary.chunks:,} chunks, "
                     f"{summary.frames:,} frames, {summary.virus_chunks:,} chunks called virus; "
                     f"{stages}; outputs in {summary.out_dir}", highlight=False)
    if json_summary:
        data = asdict(summary)
        data["wall_seconds"] = summary.wall_seconds
        typer.echo(json.dumps(data, indent=2, default=str))
    interrupted = any(e.get("interrupted") for e in summary.embed.values())
    raise typer.Exit(EXIT_INTERRUPTED if interrupted else 0)


def _positional_length(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"LENGTH {text!r}: expected the chunk length, 300 or 500") from None


@app.command(epilog="Examples: gpuengine lookup proteins.lmdb P12345 Q67890 --json;  "
                    "gpuengine lookup out/shards P12345")
def lookup(
    store: Path = typer.Argument(..., help="An LMDB store written by gpuengine embed, or a "
                                 "directory of stores (such as out/shards/) read as one."),
    ids: List[str] = typer.Argument(..., help="Record ids (the FASTA header up to the first space)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per id on stdout."),
    table: Optional[str] = typer.Option(None, "--table", help="Table to read. "
                                        "\\[default: the only one, or 'default']"),
    layer: Optional[int] = typer.Option(None, "--layer", help="Layer of the output to read."),
    pool: Optional[str] = typer.Option(None, "--pool", help="Pooling of the output to read."),
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
        raise _fail(exc if isinstance(exc, GpuEngineError) else UsageError(_message(exc))) from None
    if missing:
        raise _fail(GpuEngineError(f"not in {store}: {', '.join(missing[:20])}"
                                   + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")))


@app.command(epilog="Examples: gpuengine info proteins.lmdb --json;  gpuengine info "
                    "out/shards;  gpuengine info a.lmdb b.lmdb")
def info(stores: List[Path] = typer.Argument(..., help="An LMDB store; several stores, or a "
                                             "directory of stores, are described as one "
                                             "(counts summed over them).", show_default=False),
         table: Optional[str] = typer.Option(None, "--table", help="Describe only this table. "
                                             "\\[default: every table]"),
         as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
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
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    typer.echo(_format_info(data))


def _format_info(data: dict, indent: str = "") -> str:
    """YAML-like text: nested dicts indented, a list of dicts as one "- " item per dict."""
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            if value:
                lines.append(_format_info(value, indent + "  "))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines.append(f"{indent}{key}:")
            for item in value:
                body = _format_info(item, indent + "    ").splitlines() or [indent + "    {}"]
                body[0] = indent + "  - " + body[0][len(indent) + 4:]
                lines.extend(body)
        else:
            lines.append(f"{indent}{key}: {value}")
    return "\n".join(lines)


@app.command(epilog="Examples: gpuengine export proteins.lmdb --format npz -o proteins.npz;  "
                    "gpuengine export proteins.lmdb --format hdf5 -o reduced_embeddings_file.h5;  "
                    "gpuengine export proteins.lmdb --format fair-esm -o esm_out/;  "
                    "gpuengine export out/shards -o all.npz")
def export(
    stores: List[Path] = typer.Argument(..., help="An LMDB store; several stores, or a "
                                        "directory of stores, are exported as one (each id "
                                        "once).", show_default=False),
    output: Path = typer.Option(..., "--output", "-o", help="File to write (a directory for "
                                "fair-esm)."),
    fmt: str = typer.Option("npz", "--format", "-f", help="npz (ids, embeddings matrix), tsv, "
                            "hdf5 (one dataset per id, as bio_embeddings and ProtTrans write; "
                            "needs h5py) or fair-esm (one <id>.pt per record, as fair-esm's "
                            "extract.py writes)."),
    table: Optional[str] = typer.Option(None, "--table", help="Table to export. "
                                        "\\[default: the only one, or 'default']"),
    layer: Optional[int] = typer.Option(None, "--layer", help="Layer of the output to export."),
    pool: Optional[str] = typer.Option(None, "--pool", help="Pooling of the output to export. "
                                       "\\[default: the table's first output; fair-esm: all]"),
) -> None:
    """Export a table's embeddings for other tools: NumPy, TSV, HDF5 or fair-esm .pt files."""
    from gpuengine.export import export_store

    try:
        done = export_store(stores[0] if len(stores) == 1 else stores, output, fmt,
                            table=table, layer=layer, pool=pool)
    except GpuEngineError as exc:
        raise _fail(exc) from None
    from gpuengine.display import stderr

    stderr.print(f"exported {done.count:,} embeddings (table {done.table}, "
                 f"{', '.join(done.outputs)}) to {output}", markup=False, highlight=False)


@app.command(epilog="Examples: gpuengine merge all.lmdb out/shards;  gpuengine merge "
                    "all.lmdb a.lmdb b.lmdb c.lmdb --verify;  gpuengine merge proteins.lmdb "
                    "new.lmdb --json > merge.json")
def merge(
    out: Path = typer.Argument(..., help="The merged store: created, or added to when it "
                               "exists.", show_default=False),
    stores: List[Path] = typer.Argument(..., help="Stores to merge, or directories of stores "
                                        "(such as out/shards/), in order: the first copy of "
                                        "an id or vector is kept.", show_default=False),
    verify: bool = typer.Option(False, "--verify", help="Afterwards, read every vector and id "
                                "of every input again and compare it with OUT (exit 1 on any "
                                "difference)."),
    transaction_mb: float = typer.Option(256.0, "--transaction-mb", help="Vector MiB per "
                                         "write transaction: fewer, larger commits are faster; "
                                         "a kill loses at most one."),
    json_summary: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; warnings only."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging."),
) -> None:
    """Merge stores (the shards of a cluster run, or any stores of the same model and
    options) into one. Exactly once and restartable: after a kill, run the same command."""
    from gpuengine.display import MergeBar, print_merge_summary, setup_logging
    from gpuengine.store.merge import merge_stores

    setup_logging(verbose, quiet)
    bar = MergeBar(enabled=not quiet)
    try:
        if not transaction_mb > 0:
            raise UsageError(f"--transaction-mb {transaction_mb}: expected a positive size")
        with _stop_on_signals() as stop:
            summary = merge_stores(out, stores, verify=verify, progress=bar, stop=stop,
                                   transaction_bytes=max(1, int(transaction_mb * (1 << 20))))
    except GpuEngineError as exc:
        bar.close()
        raise _fail(exc) from None
    bar.close()
    if not quiet:
        print_merge_summary(summary)
    if json_summary:
        typer.echo(json.dumps(summary.to_json(), indent=2, default=str))
    raise typer.Exit(summary.exit_code)


@app.command(epilog="Example: gpuengine devices --model esm2_t36_3B_UR50D")
def devices(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Also show the token budget "
                                        "each device would start with for this model, and why "
                                        "(a published name needs no weight file)."),
    precision: str = typer.Option("fp16", "--precision", help="Precision for that estimate."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """List the devices gpuengine can run on, with memory (NVML where available)."""
    from dataclasses import asdict

    import torch

    from gpuengine.devices import budget_explanation, describe, parse_devices

    infos = [describe(torch.device("cpu"))] + [describe(d) for d in parse_devices("auto")
                                               if d.type == "cuda"]
    reasons = {}
    if model is not None:
        try:
            reasons = budget_explanation(model, precision, infos)
        except GpuEngineError as exc:
            raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps([{**asdict(i), **({"budget": reasons[i.device]} if i.device in reasons
                                                 else {})} for i in infos], indent=2))
        return
    for i in infos:
        memory = (f"{(i.free_bytes or 0) / 2**30:.1f} GiB free of {i.total_bytes / 2**30:.1f} GiB"
                  if i.free_bytes is not None else
                  f"{i.total_bytes / 2**30:.1f} GiB" if i.total_bytes else "memory unknown")
        typer.echo(f"{i.device}\t{i.name}\t{memory}\t(memory from {i.memory_source})")
        if i.device in reasons:
            typer.echo(f"\tbudget {reasons[i.device]['tokens']:,} tokens: {reasons[i.device]['why']}")


@app.command(epilog="Example: gpuengine serve --watch /srv/embed --store /srv/embed/store.lmdb "
                    "--model esm2_t33_650M_UR50D")
def serve(
    watch: Path = typer.Option(..., "--watch", "-w", help="Directory to watch; inbox/, "
                               "processing/, done/ and failed/ are created under it."),
    store: Path = typer.Option(..., "--store", "-o", help="LMDB store every file is embedded into."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="(--job embed) Checkpoint "
                                        "file, Hugging Face directory, or published name such as "
                                        "esm2_t33_650M_UR50D."),
    job: str = typer.Option("embed", "--job", help="embed (FASTA → store) or predict (reads → "
                            "VirNucPro outputs in DIR/predictions/<file>/, embeddings in the store)."),
    length: Optional[int] = typer.Option(None, "--length", help="(--job predict) 300 or 500."),
    classifier: Optional[Path] = typer.Option(None, "--classifier", help="(--job predict) the MLP."),
    esm_model: str = typer.Option("esm2_t36_3B_UR50D", "--esm-model", help="(--job predict)"),
    esm_layer: int = typer.Option(-1, "--esm-layer", help="(--job predict)"),
    dnabert_model: str = typer.Option("zhihan1996/DNABERT-S", "--dnabert-model",
                                      help="(--job predict)"),
    layers: str = typer.Option("-1", "--layers", help="Comma-separated layers; negative counts "
                               "from the end (-1 = last). Use --layers=-1."),
    pool: List[str] = typer.Option(["mean"], "--pool", help="mean, bos, per-token."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16 or bf16. "
                                            "\\[default: fp32 on CPU, fp16 on GPU]"),
    store_dtype: str = typer.Option("float32", "--store-dtype", help="float32 or float16."),
    max_residues: Optional[int] = typer.Option(None, "--max-residues", help="Truncate longer "
                                               "sequences (0: never). \\[default: 1022 for "
                                               "ESM-2]",
                                               show_default=False),
    table: str = typer.Option("default", "--table", help="Named table in the store."),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip invalid records "
                                      "(listed in the job record) instead of failing the file."),
    gpus: str = typer.Option("auto", "--gpus", help="auto, all, cpu, or ordinals like 0,1."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Upper bound on tokens "
                                             "per batch. \\[default: from device memory]"),
    offline: bool = typer.Option(False, "--offline", help="Never download weights."),
    poll: bool = typer.Option(False, "--poll", help="Poll only, never inotify (it is off by "
                              "itself on NFS, SMB, Lustre, GPFS and other network filesystems)."),
    poll_interval: float = typer.Option(2.0, "--poll-interval", help="Seconds between polls of "
                                        "inbox/."),
    settle: float = typer.Option(5.0, "--settle", help="A file without a marker that was not "
                                 "renamed into inbox/ is taken once unchanged this many seconds "
                                 "and complete (final newline or whole gzip)."),
    quiet_period: float = typer.Option(60.0, "--quiet-period", help="A file unchanged this many "
                                       "seconds is taken as it is, complete-looking or not "
                                       "(junk goes to failed/)."),
    max_attempts: int = typer.Option(3, "--max-attempts", help="Attempts per file before it "
                                     "goes to failed/ (bad input fails at once)."),
    retry_delay: float = typer.Option(10.0, "--retry-delay", help="Seconds before the first "
                                      "retry after an error (doubles each time)."),
    status_interval: float = typer.Option(5.0, "--status-interval", help="Seconds between "
                                          "status.json heartbeats."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging."),
) -> None:
    """Watch DIR/inbox and embed every complete FASTA file into the store, models loaded once
    (a daemon for systemd Type=notify; see docs/daemon.md). SIGTERM/Ctrl-C: drain, exit 0."""
    from gpuengine.config import EmbedConfig
    from gpuengine.daemon import ServeConfig, serve as run_daemon

    try:
        _check_table(table)
        if watch.exists() and not watch.is_dir():
            raise UsageError(f"--watch {watch}: not a directory")
        predict_template = None
        if job == "predict":
            if length is None or classifier is None:
                raise UsageError("--job predict needs --length and --classifier")
            from gpuengine.workflows.virnucpro.pipeline import PredictConfig

            predict_template = PredictConfig(
                reads=watch / "inbox", length=length, classifier=classifier, esm_model=esm_model,
                esm_layer=esm_layer, dnabert_model=dnabert_model, store=store,
                precision=precision, devices=gpus, max_tokens=max_tokens,
                skip_invalid=skip_invalid, allow_download=not offline)
            model = model or esm_model
        elif job != "embed":
            raise UsageError(f"--job {job!r}: choose embed or predict")
        elif model is None:
            raise UsageError("--job embed needs --model")
        embed_config = EmbedConfig(
            inputs=(watch / "inbox",), model=model, out=store, layers=_parse_layers(layers),
            pools=tuple(_split(pool)), precision=precision, store_dtype=store_dtype,
            max_residues=-1 if max_residues is None else (max_residues or None), table=table,
            skip_invalid=skip_invalid, devices=gpus, max_tokens=max_tokens,
            allow_download=not offline)
        config = ServeConfig(watch=watch, embed=embed_config, poll_interval=poll_interval,
                             force_poll=poll, quiet_period=quiet_period,
                             settle=settle, max_attempts=max_attempts, retry_delay=retry_delay,
                             status_interval=status_interval, predict=predict_template)
    except GpuEngineError as exc:
        raise _fail(exc) from None
    raise typer.Exit(run_daemon(config, verbose=verbose, quiet=quiet))


@app.command(epilog="Example: gpuengine status /srv/embed")
def status(directory: Path = typer.Argument(..., help="The directory a gpuengine serve watches "
                                            "(or its status.json)."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
    """Show a daemon's status.json; exit 1 when its heartbeat is stale (older than 3 status
    intervals), the daemon stopped, or there is no status file."""
    from gpuengine.daemon import status_command

    raise typer.Exit(status_command(directory, as_json))


@app.command(epilog="Examples: gpuengine check proteins.fasta --model esm2_t36_3B_UR50D "
                    "--precision fp16,fp8 --min-cosine 0.99;  gpuengine check reads.fasta -m "
                    "esm2_t36_3B_UR50D --precision fp8 --classifier 500_model.pth")
def check(
    inputs: List[Path] = typer.Argument(..., help="FASTA files (plain or gzip): your own "
                                        "sequences (reads, with a VirNucPro classifier).",
                                        show_default=False),
    model: str = typer.Option(..., "--model", "-m", help="Checkpoint file, model directory or "
                              "published name, as for embed."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Comma-separated: fp16, "
                                            "bf16, fp8. \\[default: fp16,bf16 (+fp8 where the "
                                            "GPU runs it) on a GPU; bf16 on the CPU]"),
    sample: int = typer.Option(512, "--sample", "-n", help="Sequences to compare, spread evenly "
                               "over the input."),
    min_cosine: Optional[float] = typer.Option(None, "--min-cosine", help="Exit 1 when a "
                                               "precision's min cosine to fp32 is below this."),
    classifier: Optional[Path] = typer.Option(None, "--classifier", "-c", help="Also report "
                                              "how many labels stay the same: a VirNucPro MLP "
                                              "(then the input holds reads) or one on this "
                                              "model's embeddings alone."),
    length: Optional[int] = typer.Option(None, "--length", "-l", help="VirNucPro chunk length, "
                                         "300 or 500. \\[default: from the classifier's name]"),
    partner_model: Optional[str] = typer.Option(None, "--partner-model", help="VirNucPro's "
                                                "other model (run at fp32). \\[default: "
                                                "DNABERT-S for ESM-2, esm2_t36_3B_UR50D for "
                                                "DNABERT-S]"),
    layer: int = typer.Option(-1, "--layer", help="Layer to compare (-1: last)."),
    fp8_gemms: Optional[str] = typer.Option(None, "--fp8-gemms", help="Which GEMMs of each "
                                            "layer run in FP8: all, none, or some of "
                                            "qkv,out_proj,fc1,fc2. \\[default: the run default]"),
    gpus: str = typer.Option("auto", "--gpus", help="auto, cpu, or an ordinal like 0 (check "
                             "runs on one device: the first given)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Tokens per batch. "
                                             "\\[default: 16384 on a GPU, 4096 on the CPU]"),
    offline: bool = typer.Option(False, "--offline", help="Never download weights."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress; warnings only."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging."),
) -> None:
    """Compare precisions against fp32 on a sample of your own sequences: cosine, max error,
    tokens/s, classifier labels. Run it before a long fp16/bf16/fp8 run."""
    from gpuengine.display import setup_logging

    setup_logging(verbose, quiet)
    try:
        from gpuengine.check import CheckConfig, format_report, run_check

        config = CheckConfig(
            inputs=tuple(inputs), model=model,
            precisions=tuple(_split([precision])) if precision else None, sample=sample,
            min_cosine=min_cosine, classifier=classifier, length=length,
            partner_model=partner_model, devices=gpus, layer=layer, max_tokens=max_tokens,
            fp8_gemms=fp8_gemms, allow_download=not offline)
        report = run_check(config, None if quiet else _StageLog())
    except GpuEngineError as exc:
        raise _fail(exc) from None
    typer.echo(json.dumps(report.to_json(), indent=2) if as_json else format_report(report))
    raise typer.Exit(1 if report.failed else 0)


class _StageLog:
    """Progress of a check: one line per stage on stderr."""

    def stage(self, text: str) -> None:
        from gpuengine.display import stderr

        stderr.print(f"check: {text}", markup=False, highlight=False)


for _info in app.registered_commands:  # every command's --help without <bool> (see _Command)
    _info.cls = _Command


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
