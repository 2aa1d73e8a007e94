"""The ``gpuengine`` command line. Each command parses, builds a config and makes one call.
The store commands (lookup, info, export, merge) are in :mod:`gpuengine.cli_store`, ``slurm``
in :mod:`gpuengine.cli_slurm`; both are added to :data:`app` here.

Heavy imports (torch, the models) happen inside the commands so that ``--help`` is instant.
Exit codes: 0 ok, 1 error, 2 usage, 3 partial (some sequences failed), 4 refused (a lossy
precision below its fidelity threshold), 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from gpuengine import __version__
from gpuengine.cli_options import (CheckClassifier, CheckGpus, CheckLayer, CheckLength,
                                   CheckMaxTokens, CheckPrecisions, CheckSample, Fp8Gemms,
                                   Fp8MinCosine, Gpus, GroupFiles, JsonSummary, Layers,
                                   MaxAttempts, MaxResidues, MaxTokens, MinCosine, Offline,
                                   PartnerModel, Poll, PollInterval, Pools, Precision,
                                   PrintJson, Quiet, QuietPeriod, ReplicasPerGpu, RetryDelay,
                                   ServeJob, ServeStore, Settle, StatusInterval, StoreDtype,
                                   Verbose, Watch, Writers)
from gpuengine.cli_options import fail as _fail
from gpuengine.errors import EXIT_INTERRUPTED, GpuEngineError, UsageError
from gpuengine.vocabulary import FP8_MIN_COSINE

HELP = """Exact, packed protein (ESM-2) and DNA (DNABERT-S) embeddings on every GPU, into LMDB.

[bold]Examples[/bold]

  gpuengine embed proteins.fasta.gz --model esm2_t33_650M_UR50D --out proteins.lmdb
  gpuengine embed a.fa b.fa.gz -m esm2_t36_3B_UR50D.pt -o store.lmdb --layers 20,-1 --pool mean,bos
  gpuengine lookup proteins.lmdb P12345 --json
  gpuengine info proteins.lmdb
  gpuengine merge all.lmdb out/shards --verify        (or: gpuengine merge all.lmdb a.lmdb b.lmdb)
  gpuengine slurm embed big.fasta -m esm2_t33_650M_UR50D --out /shared/run --shards 16
  gpuengine slurm status /shared/run
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
def _main(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True,
        help="Print the version and exit.")] = None) -> None:
    """Exact, packed protein (ESM-2) and DNA (DNABERT-S) embeddings on every GPU, into LMDB."""


def _split(values: List[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


@app.command(epilog="Example: gpuengine embed proteins.fasta.gz --model esm2_t33_650M_UR50D "
                    "--out proteins.lmdb")
def embed(
    inputs: Annotated[List[Path], typer.Argument(
        help="FASTA or FASTQ files (plain or gzip; told by content).", show_default=False)],
    model: Annotated[str, typer.Option(
        "--model", "-m", help="Checkpoint file (esm2_*.pt), Hugging Face directory, or "
        "published name such as esm2_t33_650M_UR50D.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="LMDB store (directory); resumed if "
                                      "it exists.")],
    layers: Layers = "-1",
    pool: Pools = ["mean"],
    precision: Precision = None,
    fp8_min_cosine: Fp8MinCosine = FP8_MIN_COSINE,
    store_dtype: StoreDtype = "float32",
    max_residues: MaxResidues = None,
    table: Annotated[str, typer.Option(
        "--table", help="Named table in the store; a new name adds another model/layer/pooling "
        "to an existing store.")] = "default",
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid", help="Skip invalid records (counted) instead of stopping before the "
        "model loads.")] = False,
    shard: Annotated[Optional[str], typer.Option(
        "--shard", help="Embed only shard I of N (0-based, e.g. 3/8): the records whose "
        "sequence's digest falls in it; the N shards' stores hold every record once "
        "(merge them with gpuengine merge). See docs/cluster.md.")] = None,
    gpus: Gpus = "auto",
    max_tokens: MaxTokens = None,
    replicas_per_gpu: ReplicasPerGpu = 1,
    writers: Writers = None,
    offline: Offline = False,
    json_summary: JsonSummary = False,
    quiet: Quiet = False,
    verbose: Verbose = 0,
) -> None:
    """Embed FASTA or FASTQ records into an LMDB store (resumable; identical sequences computed once)."""
    from gpuengine.display import RichProgress, announce_stop, print_summary, setup_logging
    from gpuengine.signals import StopOnSignals

    setup_logging(verbose, quiet)
    try:
        _check_table(table)
        config = _embed_config(tuple(inputs), model, out, layers, pool, precision, store_dtype,
                               max_residues, table, skip_invalid, gpus, max_tokens, offline,
                               fp8_min_cosine, replicas_per_gpu, shard, writers=writers)
        from gpuengine.engine import run_embed

        with StopOnSignals(on_stop=announce_stop) as stop:
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
    from gpuengine.vocabulary import check_table_name

    check_table_name(name)


def _embed_config(inputs: tuple[Path, ...], model: str, out: Path, layers: str, pool: List[str],
                  precision: Optional[str], store_dtype: str, max_residues: Optional[int],
                  table: str, skip_invalid: bool, gpus: str, max_tokens: Optional[int],
                  offline: bool, fp8_min_cosine: float, replicas_per_gpu: int = 1,
                  shard: Optional[str] = None, *, writers: Optional[int] = 1):
    """The :class:`~gpuengine.config.EmbedConfig` of ``embed``'s (and ``serve``'s) options."""
    from gpuengine.config import EmbedConfig
    from gpuengine.shards import Shard

    return EmbedConfig(
        inputs=inputs, model=model, out=out, layers=_parse_layers(layers),
        pools=tuple(_split(pool)), precision=precision, store_dtype=store_dtype,
        max_residues=-1 if max_residues is None else (max_residues or None), table=table,
        skip_invalid=skip_invalid, devices=gpus, max_tokens=max_tokens,
        replicas_per_gpu=replicas_per_gpu, allow_download=not offline,
        fp8_min_cosine=fp8_min_cosine,
        shard=None if shard is None else Shard.parse(shard), writers=writers)


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _split([text]))
    except ValueError:
        raise UsageError(f"--layers {text!r}: expected comma-separated integers like 33 or -1") from None


@app.command(epilog="Examples: gpuengine predict reads.fasta --length 500 --classifier "
                    "500_model.pth;  gpuengine predict reads.fastq.gz 500 500_model.pth")
def predict(
    args: Annotated[List[str], typer.Argument(
        help="reads.fasta [LENGTH CLASSIFIER] (the original tool's positional form is "
        "accepted; FASTQ reads, plain or gzip, too).", show_default=False)],
    length: Annotated[Optional[int], typer.Option(
        "--length", "-l", help="Expected chunk length: 300 or 500, matching the "
        "classifier.")] = None,
    classifier: Annotated[Optional[Path], typer.Option(
        "--classifier", "-c", help="The MLP: the published 300_model.pth/500_model.pth (read "
        "without running code), a state dict or safetensors.")] = None,
    esm_model: Annotated[str, typer.Option(
        "--esm-model", help="The ESM-2 (checkpoint, directory or published "
        "name).")] = "esm2_t36_3B_UR50D",
    esm_layer: Annotated[int, typer.Option(
        "--esm-layer", help="ESM-2 layer (-1: last, 36 for 3B).")] = -1,
    dnabert_model: Annotated[str, typer.Option(
        "--dnabert-model", help="The DNABERT-S (directory, or the hub name from the local "
        "Hugging Face cache).")] = "zhihan1996/DNABERT-S",
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Output folder. "
        "\\[default: <input base>_merged/ next to the input]")] = None,
    store: Annotated[Optional[Path], typer.Option(
        "--store", help="Embedding store. \\[default: <out>/embeddings.lmdb]")] = None,
    precision: Precision = None,
    fp8_min_cosine: Fp8MinCosine = FP8_MIN_COSINE,
    gpus: Gpus = "auto",
    max_tokens: MaxTokens = None,
    replicas_per_gpu: ReplicasPerGpu = 1,
    keep_intermediate: Annotated[bool, typer.Option(
        "--keep-intermediate", help="Also write the chunked reads and the identified "
        "nucleotide/protein FASTA files.")] = False,
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid", help="Skip invalid reads (counted) instead of stopping before the "
        "models load.")] = False,
    shard: Annotated[Optional[str], typer.Option(
        "--shard", help="Predict only shard I of N (0-based, e.g. 3/8): the reads whose "
        "sequence's digest falls in it, with all their chunks and frames. See "
        "docs/cluster.md.")] = None,
    score_only: Annotated[bool, typer.Option(
        "--score-only", help="Load no embedding model: write the outputs from the features "
        "already in --store (e.g. the merged stores of the shards); a missing one is an "
        "error.")] = False,
    offline: Offline = False,
    json_summary: JsonSummary = False,
    quiet: Quiet = False,
    verbose: Verbose = 0,
) -> None:
    """VirNucPro viral-read prediction: per-frame scores, per-chunk and per-read calls."""
    from dataclasses import asdict

    from gpuengine.display import RichProgress, announce_stop, setup_logging
    from gpuengine.signals import StopOnSignals

    setup_logging(verbose, quiet)
    try:
        if len(args) == 3 and length is None and classifier is None:
            args, length, classifier = args[:1], _positional_length(args[1]), Path(args[2])
        if len(args) != 1 or length is None or classifier is None:
            raise UsageError("give reads.fasta with --length and --classifier (or the original "
                             "form: reads.fasta LENGTH CLASSIFIER)")
        from gpuengine.shards import Shard
        from gpuengine.workflows.virnucpro.pipeline import PredictConfig, run_predict

        config = PredictConfig(reads=Path(args[0]), length=length, classifier=classifier,
                               esm_model=esm_model, esm_layer=esm_layer,
                               dnabert_model=dnabert_model, out=out, store=store,
                               precision=precision, fp8_min_cosine=fp8_min_cosine,
                               devices=gpus, max_tokens=max_tokens,
                               replicas_per_gpu=replicas_per_gpu,
                               keep_intermediate=keep_intermediate, skip_invalid=skip_invalid,
                               allow_download=not offline, score_only=score_only,
                               shard=None if shard is None else Shard.parse(shard))
        with StopOnSignals(on_stop=announce_stop) as stop:
            summary = run_predict(config, RichProgress(enabled=not quiet), stop)
    except GpuEngineError as exc:
        raise _fail(exc) from None
    if not quiet:
        from gpuengine.display import print_predict_summary

        print_predict_summary(summary)
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


# lookup, info, export, merge: gpuengine/cli_store.py (here, so --help lists them in this place)
from gpuengine.cli_store import commands as _store_commands  # noqa: E402

app.registered_commands += _store_commands.registered_commands


@app.command(epilog="Example: gpuengine devices --model esm2_t36_3B_UR50D")
def devices(
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="Also show the token budget each device would start with for "
        "this model, and why (a published name needs no weight file).")] = None,
    precision: Annotated[str, typer.Option(
        "--precision", help="Precision for that estimate.")] = "fp16",
    as_json: PrintJson = False,
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
    watch: Watch,
    store: ServeStore,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="(--job embed) Checkpoint file, Hugging Face directory, or "
        "published name such as esm2_t33_650M_UR50D.")] = None,
    job: ServeJob = "embed",
    length: Annotated[Optional[int], typer.Option(
        "--length", help="(--job predict) 300 or 500.")] = None,
    classifier: Annotated[Optional[Path], typer.Option(
        "--classifier", help="(--job predict) the MLP.")] = None,
    esm_model: Annotated[str, typer.Option(
        "--esm-model", help="(--job predict)")] = "esm2_t36_3B_UR50D",
    esm_layer: Annotated[int, typer.Option("--esm-layer", help="(--job predict)")] = -1,
    dnabert_model: Annotated[str, typer.Option(
        "--dnabert-model", help="(--job predict)")] = "zhihan1996/DNABERT-S",
    layers: Layers = "-1",
    pool: Pools = ["mean"],
    precision: Precision = None,
    fp8_min_cosine: Fp8MinCosine = FP8_MIN_COSINE,
    store_dtype: StoreDtype = "float32",
    max_residues: MaxResidues = None,
    table: Annotated[str, typer.Option(
        "--table", help="Named table in the store.")] = "default",
    skip_invalid: Annotated[bool, typer.Option(
        "--skip-invalid", help="Skip invalid records (listed in the job record) instead of "
        "failing the file.")] = False,
    gpus: Gpus = "auto",
    max_tokens: MaxTokens = None,
    replicas_per_gpu: ReplicasPerGpu = 1,
    offline: Offline = False,
    poll: Poll = False,
    poll_interval: PollInterval = 2.0,
    settle: Settle = 5.0,
    quiet_period: QuietPeriod = 60.0,
    max_attempts: MaxAttempts = 3,
    retry_delay: RetryDelay = 10.0,
    group_files: GroupFiles = 1024,
    status_interval: StatusInterval = 5.0,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="Warnings and errors only.")] = False,
    verbose: Verbose = 0,
) -> None:
    """Watch DIR/inbox and embed every complete FASTA file into the store, models loaded once
    (a daemon for systemd Type=notify; see docs/daemon.md). SIGTERM/Ctrl-C: drain, exit 0."""
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
                precision=precision, fp8_min_cosine=fp8_min_cosine, devices=gpus,
                max_tokens=max_tokens, replicas_per_gpu=replicas_per_gpu,
                skip_invalid=skip_invalid, allow_download=not offline)
            model = model or esm_model
        elif job != "embed":
            raise UsageError(f"--job {job!r}: choose embed or predict")
        elif model is None:
            raise UsageError("--job embed needs --model")
        embed_config = _embed_config((watch / "inbox",), model, store, layers, pool, precision,
                                     store_dtype, max_residues, table, skip_invalid, gpus,
                                     max_tokens, offline, fp8_min_cosine, replicas_per_gpu)
        config = ServeConfig(watch=watch, embed=embed_config, poll_interval=poll_interval,
                             force_poll=poll, quiet_period=quiet_period,
                             settle=settle, max_attempts=max_attempts, retry_delay=retry_delay,
                             status_interval=status_interval, predict=predict_template,
                             group_files=group_files)
    except GpuEngineError as exc:
        raise _fail(exc) from None
    raise typer.Exit(run_daemon(config, verbose=verbose, quiet=quiet))


@app.command(epilog="Example: gpuengine status /srv/embed")
def status(directory: Annotated[Path, typer.Argument(
               help="The directory a gpuengine serve watches (or its status.json).")],
           as_json: PrintJson = False) -> None:
    """Show a daemon's status.json; exit 1 when its heartbeat is stale (older than 3 status
    intervals), the daemon stopped, or there is no status file."""
    from gpuengine.daemon import status_command

    raise typer.Exit(status_command(directory, as_json))


@app.command(epilog="Examples: gpuengine check proteins.fasta --model esm2_t36_3B_UR50D "
                    "--precision fp16,fp8 --min-cosine 0.99;  gpuengine check reads.fasta -m "
                    "esm2_t36_3B_UR50D --precision fp8 --classifier 500_model.pth")
def check(
    inputs: Annotated[List[Path], typer.Argument(
        help="FASTA files (plain or gzip): your own sequences (reads, with a VirNucPro "
        "classifier).", show_default=False)],
    model: Annotated[str, typer.Option(
        "--model", "-m", help="Checkpoint file, model directory or published name, as for "
        "embed.")],
    precision: CheckPrecisions = None,
    sample: CheckSample = 512,
    min_cosine: MinCosine = None,
    classifier: CheckClassifier = None,
    length: CheckLength = None,
    partner_model: PartnerModel = None,
    layer: CheckLayer = -1,
    fp8_gemms: Fp8Gemms = None,
    gpus: CheckGpus = "auto",
    max_tokens: CheckMaxTokens = None,
    offline: Offline = False,
    as_json: PrintJson = False,
    quiet: Quiet = False,
    verbose: Verbose = 0,
) -> None:
    """Compare precisions against fp32 on a sample of your own sequences: cosine, max error,
    tokens/s, classifier labels. Run it before a long fp16/bf16/fp8 run."""
    from gpuengine.display import StageLog, setup_logging

    setup_logging(verbose, quiet)
    try:
        from gpuengine.check import CheckConfig, format_report, run_check

        config = CheckConfig(
            inputs=tuple(inputs), model=model,
            precisions=tuple(_split([precision])) if precision else None, sample=sample,
            min_cosine=min_cosine, classifier=classifier, length=length,
            partner_model=partner_model, devices=gpus, layer=layer, max_tokens=max_tokens,
            fp8_gemms=fp8_gemms, allow_download=not offline)
        report = run_check(config, None if quiet else StageLog("check"))
    except GpuEngineError as exc:
        raise _fail(exc) from None
    typer.echo(json.dumps(report.to_json(), indent=2) if as_json else format_report(report))
    raise typer.Exit(1 if report.failed else 0)


for _info in app.registered_commands:  # every command's --help without <bool> (see _Command)
    _info.cls = _Command

from gpuengine.cli_slurm import build_slurm_app  # noqa: E402 - built from embed's and predict's

app.add_typer(build_slurm_app(embed, predict, _fail, _Group, _Command), name="slurm")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
