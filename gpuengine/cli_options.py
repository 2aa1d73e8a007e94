"""Command-line options that several ``gpuengine`` commands share, declared once, and the
daemon's own settings (``serve``: each maps onto a field of
:class:`~gpuengine.daemon.ServeConfig`).

Each is a typer ``Annotated`` alias: the flags, the type and the help text live here, the
default in the command's signature (``gpus: Gpus = "auto"``; typer takes defaults only from
there). An option whose help says something particular to one command (``serve``'s
``--skip-invalid`` fails a file, ``embed``'s stops the run) is declared in that command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

# -- how to run (embed, predict, serve) -----------------------------------------------------

Precision = Annotated[Optional[str], typer.Option(
    "--precision", help="fp32, fp16 or bf16. \\[default: fp32 on CPU, fp16 on GPU]")]
Gpus = Annotated[str, typer.Option("--gpus", help="auto, all, cpu, or ordinals like 0,1.")]
MaxTokens = Annotated[Optional[int], typer.Option(
    "--max-tokens", help="Upper bound on tokens per batch. \\[default: from device memory]")]
Offline = Annotated[bool, typer.Option("--offline", help="Never download weights.")]
ReplicasPerGpu = Annotated[int, typer.Option(
    "--replicas-per-gpu", min=1, max=16,
    help="Model replicas per device, each with its own thread and CUDA streams, fed by one "
    "scheduler; a GPU's replicas share its weights and split its free memory (the CPU: its "
    "threads). Can keep a GPU busier with a small model.")]

# -- what to store (embed, serve) -------------------------------------------------------------

StoreDtype = Annotated[str, typer.Option("--store-dtype", help="float32 or float16.")]

# -- what to print (embed, predict; verbose also serve) ---------------------------------------

JsonSummary = Annotated[bool, typer.Option("--json",
                                           help="Print the summary as JSON on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q",
                                     help="No progress bar; warnings only.")]
Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging.")]

# -- reading a store (info, export; devices and status: --json) ------------------------------

StoresArgument = Annotated[List[Path], typer.Argument(
    help="An LMDB store; several stores, or a directory of stores (such as out/shards/), are "
    "read as one (each id once; info sums the counts).", show_default=False)]
PrintJson = Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")]

# -- the daemon (serve) -----------------------------------------------------------------------

Watch = Annotated[Path, typer.Option(
    "--watch", "-w", help="Directory to watch; inbox/, processing/, done/ and failed/ are "
    "created under it.")]
ServeStore = Annotated[Path, typer.Option(
    "--store", "-o", help="LMDB store every file is embedded into.")]
ServeJob = Annotated[str, typer.Option(
    "--job", help="embed (FASTA → store) or predict (reads → VirNucPro outputs in "
    "DIR/predictions/<file>/, embeddings in the store).")]
Poll = Annotated[bool, typer.Option(
    "--poll", help="Poll only, never inotify (it is off by itself on NFS, SMB, Lustre, GPFS "
    "and other network filesystems).")]
PollInterval = Annotated[float, typer.Option(
    "--poll-interval", help="Seconds between polls of inbox/.")]
Settle = Annotated[float, typer.Option(
    "--settle", help="A file without a marker that was not renamed into inbox/ is taken once "
    "unchanged this many seconds and complete (final newline or whole gzip).")]
QuietPeriod = Annotated[float, typer.Option(
    "--quiet-period", help="A file unchanged this many seconds is taken as it is, "
    "complete-looking or not (junk goes to failed/).")]
MaxAttempts = Annotated[int, typer.Option(
    "--max-attempts", help="Attempts per file before it goes to failed/ (bad input fails at "
    "once).")]
RetryDelay = Annotated[float, typer.Option(
    "--retry-delay", help="Seconds before the first retry after an error (doubles each "
    "time).")]
GroupFiles = Annotated[int, typer.Option(
    "--group-files", min=1,
    help="(--job embed) Up to this many small files waiting in inbox/ are embedded in one "
    "run, sharing batches; each still moves to done/ on its own once its vectors and job "
    "record are committed. 1: one run per file.")]
StatusInterval = Annotated[float, typer.Option(
    "--status-interval", help="Seconds between status.json heartbeats.")]
