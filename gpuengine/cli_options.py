"""Command-line options that several ``gpuengine`` commands share, declared once, the
daemon's own settings (``serve``: each maps onto a field of
:class:`~gpuengine.daemon.ServeConfig`) and ``check``'s (:class:`~gpuengine.check.CheckConfig`).

Each is a typer ``Annotated`` alias: the flags, the type and the help text live here, the
default in the command's signature (``gpus: Gpus = "auto"``; typer takes defaults only from
there). An option whose help says something particular to one command (``serve``'s
``--skip-invalid`` fails a file, ``embed``'s stops the run) is declared in that command.

Also how every command reports a :class:`~gpuengine.errors.GpuEngineError` (:func:`fail`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from gpuengine.errors import GpuEngineError

# -- how to run (embed, predict, serve) -----------------------------------------------------

Precision = Annotated[Optional[str], typer.Option(
    "--precision", help="fp32, fp16, bf16 or fp8 (fp8: ESM-2 on GPUs of compute capability "
    ">= 8.9, lossy, measured on a sample of the input first: see --fp8-min-cosine; predict "
    "runs its ESM-2 stage in fp8, DNABERT-S in fp16). \\[default: fp32 on CPU, fp16 on GPU]")]
Fp8MinCosine = Annotated[float, typer.Option(
    "--fp8-min-cosine", help="With --precision fp8: before anything is written, a sample of "
    "the input is embedded at fp16 and fp8; below this min cosine the run is refused (exit "
    "4). `gpuengine check` shows the numbers first.")]
Gpus = Annotated[str, typer.Option("--gpus", help="auto, all, cpu, or ordinals like 0,1.")]
MaxTokens = Annotated[Optional[int], typer.Option(
    "--max-tokens", help="Upper bound on tokens per batch. \\[default: from device memory]")]
Layers = Annotated[str, typer.Option(
    "--layers", help="Comma-separated layers; negative counts from the end (-1 = last, "
    "final-LayerNorm output). Use --layers=-1.")]
Pools = Annotated[List[str], typer.Option(
    "--pool", help="mean, bos, per-token (repeat or comma-separate for several).")]
MaxResidues = Annotated[Optional[int], typer.Option(
    "--max-residues", help="Truncate longer sequences to this many residues (0: never). "
    "\\[default: 1022 for ESM-2, as fair-esm's extract.py; none for DNA models]",
    show_default=False)]
Offline = Annotated[bool, typer.Option("--offline", help="Never download weights.")]
ReplicasPerGpu = Annotated[int, typer.Option(
    "--replicas-per-gpu", min=1, max=16,
    help="Model replicas per device, each with its own thread and CUDA streams, fed by one "
    "scheduler; a GPU's replicas share its weights and split its free memory (the CPU: its "
    "threads). Can keep a GPU busier with a small model.")]
Writers = Annotated[Optional[int], typer.Option(
    "--writers", min=1, max=16, show_default=False,
    help="Store writer processes, each writing its own part of the store: with N > 1, OUT "
    "becomes a directory of N part stores (part-00-of-04.lmdb ...), split by sequence, read as "
    "one store by lookup, info, export and EmbeddingStore, or folded into one file by "
    "gpuengine merge. Two writers pay where one limits the run (a fast model on several GPUs; the "
    "closing summary says when the writer set the pace): measured on 16 cores with 8 no-op "
    "devices, DNABERT-S reads went from ≈ 80 k/s with one writer to 139–237 k/s with two. A "
    "rerun keeps the number OUT holds. \\[default: 1]")]

# -- comparing precisions (check) -------------------------------------------------------------

CheckPrecisions = Annotated[Optional[str], typer.Option(
    "--precision", help="Comma-separated: fp16, bf16, fp8. \\[default: fp16,bf16 (+fp8 where "
    "the GPU runs it) on a GPU; bf16 on the CPU]")]
CheckSample = Annotated[int, typer.Option(
    "--sample", "-n", help="Sequences to compare, spread evenly over the input.")]
MinCosine = Annotated[Optional[float], typer.Option(
    "--min-cosine", help="Exit 1 when a precision's min cosine to fp32 is below this.")]
CheckClassifier = Annotated[Optional[Path], typer.Option(
    "--classifier", "-c", help="Also report how many labels stay the same: a VirNucPro MLP "
    "(then the input holds reads) or one on this model's embeddings alone.")]
PartnerModel = Annotated[Optional[str], typer.Option(
    "--partner-model", help="VirNucPro's other model (run at fp32). \\[default: DNABERT-S for "
    "ESM-2, esm2_t36_3B_UR50D for DNABERT-S]")]
CheckLength = Annotated[Optional[int], typer.Option(
    "--length", "-l", help="VirNucPro chunk length, 300 or 500. \\[default: from the "
    "classifier's name]")]
CheckLayer = Annotated[int, typer.Option("--layer", help="Layer to compare (-1: last).")]
CheckGpus = Annotated[str, typer.Option(
    "--gpus", help="auto, cpu, or an ordinal like 0 (check runs on one device: the first "
    "given).")]
CheckMaxTokens = Annotated[Optional[int], typer.Option(
    "--max-tokens", help="Tokens per batch. \\[default: 16384 on a GPU, 4096 on the CPU]")]
Fp8Gemms = Annotated[Optional[str], typer.Option(
    "--fp8-gemms", help="Which GEMMs of each layer run in FP8: all, none, or some of "
    "qkv,out_proj,fc1,fc2. \\[default: the run default]")]

# -- what to store (embed, serve) -------------------------------------------------------------

StoreDtype = Annotated[str, typer.Option(
    "--store-dtype", help="float32 or float16 (half the store's size; LMDB commits its "
    "float16 vectors slower, so an 8-GPU DNABERT-S run may wait on the store).")]

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


# -- errors ---------------------------------------------------------------------------------

def fail(exc: GpuEngineError) -> typer.Exit:
    """Print ``error: <message>`` on stderr; the exit to raise, with the error's exit code."""
    from rich.text import Text

    from gpuengine.display import stderr

    # The message holds user data (paths, record ids, file contents): print it as plain text,
    # never as console markup ("[/]" in an id would crash rich, "[bold]" would vanish).
    stderr.print(Text.assemble(("error:", "bold red"), " ", str(exc)), highlight=False,
                 soft_wrap=True)
    return typer.Exit(exc.exit_code)
