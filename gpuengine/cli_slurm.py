"""``gpuengine slurm ...``: one job over many nodes as a SLURM job array plus a merge job.

``slurm embed`` and ``slurm predict`` take the plain command's own options — their
declarations are taken from the ``embed``/``predict`` functions' signatures, not written again —
plus the cluster's (:func:`_cluster_options`). They write OUT/slurm/*.sbatch and submit them
(:mod:`gpuengine.slurm.submit`); ``slurm status`` reads the run's markers and SLURM's queue;
``slurm shard`` and ``slurm merge`` are what the scripts run on the nodes
(:mod:`gpuengine.slurm.task`). docs/cluster.md is the user's guide.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, List, Optional

import typer

from gpuengine.cli_options import PrintJson, Quiet, Verbose
from gpuengine.errors import GpuEngineError, InputError, UsageError

HELP = """Run [bold]embed[/bold] or [bold]predict[/bold] over many nodes: a SLURM job array of N
shards (one gpuengine per node, on all its GPUs, writing on node-local disk) and a merge job.

[bold]Examples[/bold]

  gpuengine slurm embed uniprot.fasta.gz -m esm2_t33_650M_UR50D --out /shared/uniprot \\
      --shards 64 --gpus-per-node 8 --partition gpu --time 12:00:00 --sbatch-arg=--account=lab
  gpuengine slurm status /shared/uniprot
  gpuengine slurm embed uniprot.fasta.gz -m esm2_t33_650M_UR50D --out /shared/uniprot \\
      --shards 64 --no-merge     [dim]# no merge job: read /shared/uniprot/shards as one store[/dim]
  gpuengine slurm predict reads.fasta -l 500 -c 500_model.pth --out /shared/run1 --shards 16

Submitting the same command again runs only the shards without a done marker (after a
preemption, a failed node, a cancelled task) and a new merge. See docs/cluster.md.
"""

SLURM_ONLY = ("shards", "gpus_per_node", "partition", "time", "mem", "cpus_per_task",
              "sbatch_arg", "local_dir", "no_merge", "dry_run")
NOT_PASSED_ON = {"embed": ("out", "json_summary", "verbose", "quiet"),
                 "predict": ("out", "store", "json_summary", "verbose", "quiet")}
"""The plain command's options the tasks set themselves, or that only change this process's
logging (a resubmission may differ in them)."""
MODEL_OPTIONS = ("model", "esm_model", "dnabert_model")
"""Options naming a model that may be a relative path (made absolute for the nodes)."""


def _cluster_options(
    shards: Annotated[int, typer.Option(
        "--shards", help="Shards (array tasks, one node each); each is an ordinary run over "
        "1/N of the input.", show_default=False)],
    gpus_per_node: Annotated[int, typer.Option(
        "--gpus-per-node", help="GPUs each task asks for (--gres=gpu:K); its gpuengine uses "
        "all of them. 0: CPU-only nodes.")] = 1,
    partition: Annotated[Optional[str], typer.Option(
        "--partition", help="SLURM partition (sbatch --partition).")] = None,
    time: Annotated[Optional[str], typer.Option(
        "--time", help="Time limit of each task and of the merge, e.g. 12:00:00 (a task is "
        "told 3 minutes before it and saves its work for the next attempt).")] = None,
    mem: Annotated[Optional[str], typer.Option(
        "--mem", help="Memory per node (sbatch --mem), e.g. 200G.")] = None,
    cpus_per_task: Annotated[Optional[int], typer.Option(
        "--cpus-per-task", help="CPU cores per task (sbatch --cpus-per-task).")] = None,
    sbatch_arg: Annotated[List[str], typer.Option(
        "--sbatch-arg", help="Another sbatch option for both jobs, e.g. --sbatch-arg=--account=lab "
        "(repeatable).")] = [],
    local_dir: Annotated[Optional[str], typer.Option(
        "--local-dir", help="Node-local directory where a task writes its store (LMDB must not "
        "be written on a network filesystem); a $VARIABLE is expanded on the node. "
        "\\[default: $TMPDIR, else /tmp]", show_default=False)] = None,
    no_merge: Annotated[bool, typer.Option(
        "--no-merge", help="embed only: submit the array alone, no merge job; OUT/shards/ is "
        "the result (gpuengine lookup/info/export read it as one store; gpuengine merge "
        "merges it later). Part of the run: a resubmission must repeat it.")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Write the sbatch scripts and print the sbatch commands; submit "
        "nothing.")] = False,
) -> None:
    """(signature only: the cluster options of ``slurm embed``/``slurm predict``)"""


def _signature(plain: Callable, command: str) -> inspect.Signature:
    """The plain command's parameters (``--out`` re-described, ``--shard``/``--score-only``
    left out: the run sets them; ``--writers`` too: a shard's store is one store) followed
    by the cluster options, all keyword-only."""
    out_help = {"embed": "Output directory (shared by the nodes): OUT/store.lmdb is the merged "
                         "store; OUT/shards/, OUT/slurm/ (scripts, logs) are made there.",
                "predict": "Output directory (shared by the nodes): the prediction files and "
                           "embeddings.lmdb, as one run writes them; OUT/shards/, OUT/slurm/ "
                           "are made there. \\[default: <input base>_merged/ next to the input]"}
    params = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
    for param in inspect.signature(plain, eval_str=True).parameters.values():
        if param.name in ("shard", "score_only", "writers"):  # a shard writes one store
            continue
        if param.name == "out":
            kind = Path if command == "embed" else Optional[Path]
            param = param.replace(annotation=Annotated[kind, typer.Option(
                "--out", "-o", help=out_help[command], show_default=False)])
        if param.name == "json_summary":
            param = param.replace(annotation=Annotated[bool, typer.Option(
                "--json", help="Print what was submitted (job ids, scripts) as JSON on "
                "stdout.")])
        params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    for param in inspect.signature(_cluster_options, eval_str=True).parameters.values():
        params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    return inspect.Signature(params)


def _text(param: Any, value: Any) -> str:
    if isinstance(value, Path):
        return os.path.abspath(value)
    if param.name in MODEL_OPTIONS and isinstance(value, str) and os.path.exists(value):
        return os.path.abspath(value)
    return str(value)


def plain_argv(ctx: typer.Context, values: dict[str, Any], command: str) -> list[str]:
    """The plain command's arguments that ``values`` stand for (``--opt=value`` forms, paths
    made absolute), without those the tasks set themselves."""
    skip = {"ctx", *SLURM_ONLY, *NOT_PASSED_ON[command]}
    positional: list[str] = []
    options: list[str] = []
    for param in ctx.command.params:
        if param.name in skip or param.name not in values:
            continue
        value = values[param.name]
        if param.param_type_name == "argument":
            positional.extend(_text(param, v) for v in value or ())
            continue
        opt = max(param.opts, key=len)
        if getattr(param, "count", False):
            options.extend([opt] * int(value or 0))
        elif getattr(param, "is_flag", False):
            if value:
                options.append(opt)
        elif param.multiple:
            if list(value) != list(param.default or ()):
                options.extend(f"{opt}={_text(param, v)}" for v in value)
        elif value is not None and value != param.default:
            options.append(f"{opt}={_text(param, value)}")
    return positional + options


def _check_embed(values: dict[str, Any]) -> Path:
    from gpuengine.cli import _check_table, _embed_config

    _check_table(values["table"])
    out = values["out"]
    _embed_config(tuple(values["inputs"]), values["model"], out / "store.lmdb", values["layers"],
                  values["pool"], values["precision"], values["store_dtype"],
                  values["max_residues"], values["table"], values["skip_invalid"],
                  values["gpus"], values["max_tokens"], values["offline"],
                  values["fp8_min_cosine"], values["replicas_per_gpu"])
    _check_files(values["inputs"], "input FASTA file")
    return (out / "store.lmdb").absolute()


def _check_predict(values: dict[str, Any]) -> tuple[Path, Path]:
    """(OUT, merged store) of ``slurm predict``; the positional form is normalised in
    ``values``."""
    from gpuengine.cli import _positional_length
    from gpuengine.workflows.virnucpro.pipeline import PredictConfig

    args = values["args"]
    if len(args) == 3 and values["length"] is None and values["classifier"] is None:
        values["args"] = args[:1]
        values["length"], values["classifier"] = _positional_length(args[1]), Path(args[2])
    if len(values["args"]) != 1 or values["length"] is None or values["classifier"] is None:
        raise UsageError("give reads.fasta with --length and --classifier (or the original "
                         "form: reads.fasta LENGTH CLASSIFIER)")
    values["args"] = [Path(values["args"][0])]
    _check_files(values["args"] + [values["classifier"]], "file")
    config = PredictConfig(reads=values["args"][0], length=values["length"],
                           classifier=values["classifier"], out=values["out"],
                           store=values["store"])
    return config.out_dir.absolute(), config.store_path.absolute()


def _check_files(paths: list[Path], what: str) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise InputError(f"{what} {path}: no such file (the nodes read it from the same "
                             "path: it must be on a shared filesystem)")


def _submit(command: str, values: dict[str, Any]) -> None:
    from gpuengine import __version__
    from gpuengine.slurm.layout import Manifest
    from gpuengine.slurm.scripts import SbatchOptions
    from gpuengine.slurm.submit import submit

    if values["shards"] < 1:
        raise UsageError(f"--shards {values['shards']}: at least 1")
    if values["gpus_per_node"] < 0:
        raise UsageError(f"--gpus-per-node {values['gpus_per_node']}: 0 or more")
    if values["no_merge"] and command == "predict":
        raise UsageError("--no-merge: slurm predict writes its prediction files in the merge "
                         "job (from the merged embeddings of the whole input), so it cannot "
                         "skip it; use it with slurm embed")
    if command == "embed":
        out, merged = values["out"].absolute(), _check_embed(values)
    else:
        out, merged = _check_predict(values)
    argv = plain_argv(values["ctx"], values, command)
    manifest = Manifest(command=command, argv=tuple(argv), shards=values["shards"],
                        out=str(out), merged=str(merged), python=sys.executable,
                        engine_version=__version__, merge=not values["no_merge"])
    options = SbatchOptions(gpus_per_node=values["gpus_per_node"], partition=values["partition"],
                            time=values["time"], mem=values["mem"],
                            cpus_per_task=values["cpus_per_task"],
                            sbatch_args=tuple(values["sbatch_arg"]),
                            local_dir=values["local_dir"])
    result = submit(manifest, options, dry_run=values["dry_run"])
    if values["json_summary"]:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        typer.echo(_report(result, str(merged)))


def _report(result, merged: str) -> str:
    from gpuengine.slurm.submit import index_ranges

    lines = [f"gpuengine slurm {result.command}: {result.shards} shards into {result.out}",
             f"  scripts: {result.array_script}"]
    if result.merge:
        lines.append(f"           {result.merge_script}")
    if result.complete and not result.merge:
        lines.append("  complete already: every shard is done; nothing submitted")
        return "\n".join(lines + _no_merge_lines(result, merged))
    if result.complete:
        lines.append(f"  complete already: every shard is done and merged into {merged}; "
                     "nothing submitted")
        return "\n".join(lines)
    if result.dry_run:
        lines.append("  dry run, nothing submitted; to submit:")
        lines += [f"    {' '.join(cmd)}" for cmd in result.sbatch]
        return "\n".join(lines + ([] if result.merge else _no_merge_lines(result, merged)))
    if result.cancelled:
        lines.append(f"  cancelled the stale merge job {', '.join(result.cancelled)} "
                     "of an earlier submission")
    jobs = [j for j in (result.array_job, result.merge_job) if j]
    if result.array_job:
        lines.append(f"  array job {result.array_job}: shards {index_ranges(result.missing)}"
                     f" ({len(result.missing)} of {result.shards})")
    if result.merge:
        lines.append(f"  merge job {result.merge_job}"
                     + (f" (afterok:{result.array_job})" if result.array_job else "")
                     + f": merges into {merged}")
    lines.append(f"  follow: squeue -j {','.join(jobs)}  |  sacct -j {','.join(jobs)}  |  "
                 f"gpuengine slurm status {result.out}")
    lines.append(f"  logs:   {Path(result.out) / 'slurm' / 'logs'}/")
    return "\n".join(lines + ([] if result.merge else _no_merge_lines(result, merged)))


def _no_merge_lines(result, merged: str) -> list[str]:
    shards = Path(result.out) / "shards"
    return ["  no merge job (--no-merge): once the shards are done, read them as one store:",
            f"    gpuengine lookup {shards} ID  |  gpuengine info {shards}  |  "
            f"gpuengine export {shards} ...",
            f"  or merge them later: gpuengine merge {merged} {shards}"]


def _make(command: str, plain: Callable, fail: Callable) -> Callable:
    def run(**values: Any) -> None:
        from gpuengine.display import setup_logging

        setup_logging(values.get("verbose", 0), values.get("quiet", False))
        try:
            _submit(command, values)
        except GpuEngineError as exc:
            raise fail(exc) from None

    run.__signature__ = _signature(plain, command)  # type: ignore[attr-defined]
    run.__name__ = command
    run.__doc__ = (f"Submit gpuengine {command} as a SLURM array of --shards tasks and a merge "
                   f"job; the same options as gpuengine {command}, plus the cluster's.")
    return run


def build_slurm_app(embed: Callable, predict: Callable, fail: Callable, group_cls: type,
                    command_cls: type) -> typer.Typer:
    """The ``slurm`` sub-app, its run commands built from ``embed``'s and ``predict``'s own
    signatures; ``fail`` turns a GpuEngineError into the CLI's exit."""
    app = typer.Typer(help=HELP, rich_markup_mode="rich", no_args_is_help=True,
                      epilog="Example: gpuengine slurm embed in.fasta -m esm2_t33_650M_UR50D "
                             "--out /shared/run --shards 16, then gpuengine slurm status "
                             "/shared/run",
                      cls=group_cls, context_settings={"help_option_names": ["-h", "--help"]})
    examples = {"embed": "gpuengine slurm embed in.fasta -m esm2_t33_650M_UR50D --out /shared/run "
                         "--shards 16 --gpus-per-node 8 --time 12:00:00",
                "predict": "gpuengine slurm predict reads.fasta -l 500 -c 500_model.pth --out "
                           "/shared/run --shards 16 --gpus-per-node 4"}
    for command, plain in (("embed", embed), ("predict", predict)):
        app.command(command, epilog=f"Example: {examples[command]}", cls=command_cls)(
            _make(command, plain, fail))

    @app.command("status", cls=command_cls,
                 epilog="Example: gpuengine slurm status /shared/run --json")
    def status(out: Annotated[Path, typer.Argument(help="The --out of the run.")],
               as_json: PrintJson = False) -> None:
        """Where the shards and the merge of a cluster run are.

        Shards done / running / pending / failed / missing, from the done markers and from
        squeue/sacct where they answer; exit 1 when a shard or the merge failed (submit the
        same command again)."""
        from gpuengine.slurm.status import collect, exit_code, render

        try:
            found = collect(out)
        except GpuEngineError as exc:
            raise fail(exc) from None
        typer.echo(json.dumps(found, indent=2) if as_json else render(found))
        raise typer.Exit(exit_code(found))

    _add_task_commands(app, fail, command_cls)
    return app


def _add_task_commands(app: typer.Typer, fail: Callable, command_cls: type) -> None:
    """``slurm shard`` and ``slurm merge``: what the two sbatch scripts run on the nodes."""

    @app.command("shard", cls=command_cls,
                 epilog="Run by OUT/slurm/*-array.sbatch: gpuengine slurm shard OUT "
                        "$SLURM_ARRAY_TASK_ID --local-dir $TMPDIR")
    def shard(out: Annotated[Path, typer.Argument(help="The --out of the run.")],
              index: Annotated[int, typer.Argument(help="The shard (array task id).")],
              local_dir: Annotated[Optional[Path], typer.Option(
                  "--local-dir", help="Node-local directory for the store being written. "
                  "\\[default: $TMPDIR, else /tmp]", show_default=False)] = None,
              quiet: Quiet = False, verbose: Verbose = 0) -> None:
        """(run by the array job) One shard: embed, publish, mark done.

        Runs the plain command with --shard I/N on node-local disk (resuming what an earlier
        attempt left), copies the closed store to OUT/shards/ and writes its done marker."""
        from gpuengine.display import setup_logging
        from gpuengine.slurm.task import run_shard

        setup_logging(verbose, quiet, plain=True)
        try:
            code = run_shard(out, index, local_dir or Path(os.environ.get("TMPDIR") or "/tmp"))
        except GpuEngineError as exc:
            raise fail(exc) from None
        raise typer.Exit(code)

    @app.command("merge", cls=command_cls,
                 epilog="Run by OUT/slurm/merge.sbatch: gpuengine slurm merge OUT")
    def merge(out: Annotated[Path, typer.Argument(help="The --out of the run.")],
              local_dir: Annotated[Optional[Path], typer.Option(
                  "--local-dir", help="Node-local directory for the merged store when OUT is "
                  "on a network filesystem. \\[default: $TMPDIR, else /tmp]",
                  show_default=False)] = None,
              in_place: Annotated[Optional[bool], typer.Option(
                  "--in-place/--staged", help="Write the merged store where it ends up, or on "
                  "--local-dir first and copy it. \\[default: in place unless OUT is on a "
                  "network filesystem]", show_default=False)] = None,
              quiet: Quiet = False, verbose: Verbose = 0) -> None:
        """(run by the merge job) Merge the shards; predict: write the outputs.

        Checks that every shard has its done marker, merges them into the merged store and,
        for predict, writes the output files of the whole input."""
        from gpuengine.display import setup_logging
        from gpuengine.slurm.task import run_merge

        setup_logging(verbose, quiet, plain=True)
        try:
            code = run_merge(out, local_dir or Path(os.environ.get("TMPDIR") or "/tmp"),
                             in_place)
        except GpuEngineError as exc:
            raise fail(exc) from None
        raise typer.Exit(code)
