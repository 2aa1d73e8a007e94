"""Frozen configuration dataclasses, validated on construction.

This module is the only reader of environment variables (:func:`environment`). CLI options map
onto fields one to one; the engine receives only these objects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gpuengine.errors import UsageError
from gpuengine.vocabulary import (DEFAULT_TABLE, FP8_MIN_COSINE, POOLS, PRECISIONS, STORE_DTYPES,
                                  check_table_name)

if TYPE_CHECKING:  # a field's type only: configuration (layer 0) does not import shards
    from gpuengine.shards import Shard


@dataclass(frozen=True)
class Environment:
    """Settings read from the environment, once."""

    offline: bool
    """``GPUENGINE_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``): never try to download weights."""
    cache_dir: Path
    """``GPUENGINE_CACHE`` or ``$XDG_CACHE_HOME/gpuengine`` or ``~/.cache/gpuengine``: checksum cache."""
    notify_socket: str = ""
    """``NOTIFY_SOCKET``: systemd's notification socket (empty: not under systemd)."""
    input_process: bool | None = None
    """``GPUENGINE_INPUT_PROCESS=1`` / ``0``: read the input FASTA in a child process always /
    never, where :attr:`EmbedConfig.input_process` leaves it open (unset: by input size); its
    validation too (``1``: every file shared among validation processes, ``0``: none; unset:
    files of 32 MiB or more)."""
    input_processes: int | None = None
    """``GPUENGINE_INPUT_PROCESSES=N`` (1 to 32): how many input processes read the input
    (unset: by cores, :func:`gpuengine.input_workers.process_count`)."""
    writer_process: bool | None = None
    """``GPUENGINE_WRITER_PROCESS=1`` / ``0``: commit to the store from a child process always /
    never (unset: for inputs of at least 20 000 records, as input processes;
    :mod:`gpuengine.writer_process`)."""
    input_block_bytes: int | None = None
    """``GPUENGINE_INPUT_BLOCK_BYTES=N``: bytes of a block dealt to an input process (unset:
    :data:`gpuengine.blocks.BLOCK_BYTES`; tests cut small files into many blocks with it)."""


MAX_INPUT_PROCESSES = 32


def _whole_number(name: str, low: int, high: int | None, unset: str) -> int | None:
    """The environment variable ``name`` as a whole number from ``low`` to ``high``."""
    choice = os.environ.get(name, "")
    if not choice:
        return None
    if not choice.isdigit() or int(choice) < low or (high is not None and int(choice) > high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise UsageError(f"{name}={choice!r}: give a whole number {span} (unset: {unset})")
    return int(choice)


def environment() -> Environment:
    offline = os.environ.get("GPUENGINE_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    base = os.environ.get("GPUENGINE_CACHE")
    if base:
        cache = Path(base)
    elif os.environ.get("XDG_CACHE_HOME"):
        cache = Path(os.environ["XDG_CACHE_HOME"]) / "gpuengine"
    else:
        cache = Path.home() / ".cache" / "gpuengine"
    choice = os.environ.get("GPUENGINE_INPUT_PROCESS", "")
    if choice not in ("", "0", "1"):
        raise UsageError(f"GPUENGINE_INPUT_PROCESS={choice!r}: use 1 (always), 0 (never) or "
                         "leave it unset (by input size)")
    writer = os.environ.get("GPUENGINE_WRITER_PROCESS", "")
    if writer not in ("", "0", "1"):
        raise UsageError(f"GPUENGINE_WRITER_PROCESS={writer!r}: use 1 (always), 0 (never) or "
                         "leave it unset (by input size)")
    return Environment(offline=offline, cache_dir=cache,
                       writer_process=None if not writer else writer == "1",
                       notify_socket=os.environ.get("NOTIFY_SOCKET", ""),
                       input_process=None if not choice else choice == "1",
                       input_processes=_whole_number("GPUENGINE_INPUT_PROCESSES", 1,
                                                     MAX_INPUT_PROCESSES, "by cores"),
                       input_block_bytes=_whole_number("GPUENGINE_INPUT_BLOCK_BYTES", 1, None,
                                                       "512 KiB"))


@dataclass(frozen=True)
class EmbedConfig:
    """Everything one ``gpuengine embed`` run needs."""

    inputs: tuple[Path, ...]
    """FASTA files (plain or gzip)."""
    model: str
    """A checkpoint file, a model directory or a published model name."""
    out: Path
    """The LMDB store (a directory); created if absent, appended to (resumed) if present."""
    layers: tuple[int, ...] = (-1,)
    """Representation layers; negative indices count from the end (-1 = last layer)."""
    pools: tuple[str, ...] = ("mean",)
    """Pooling modes, any of ``mean``, ``bos``, ``per-token``."""
    precision: str | None = None
    """``fp32``, ``fp16`` or ``bf16``; None = fp32 on CPU, fp16 on GPU (ESM-2's training precision)."""
    store_dtype: str = "float32"
    """How vectors are stored: ``float32`` or ``float16``."""
    max_residues: int | None = -1
    """Truncate longer sequences to this many residues: -1 = the model family's default (1022
    for ESM-2, as fair-esm's extract.py; none for DNA models), None = never."""
    table: str = DEFAULT_TABLE
    """Named table inside the store; a new name is needed to add another model/layer/pooling."""
    skip_invalid: bool = False
    """Skip invalid records (counted) instead of stopping before the model loads."""
    devices: str = "auto"
    """``auto`` (every GPU, else CPU), ``cpu``, ``all``, or CUDA ordinals like ``0,1``."""
    max_tokens: int | None = None
    """Upper bound on tokens per batch; None = derived from device memory."""
    commit_every: int = 8192
    """Sequences per write transaction (a group of batches)."""
    allow_download: bool = True
    """Download a named model into the torch-hub cache when it is missing."""
    compile: bool | None = None
    """Fast per-layer kernels on GPUs — the model's Triton kernels where Triton runs, else
    ``torch.compile``d ones (None: on for GPUs; the CPU always runs the eager layers)."""
    threads: int | None = None
    """CPU threads for a CPU run (None: torch's default); split among the CPU's replicas."""
    fp8_min_cosine: float = FP8_MIN_COSINE
    """``--precision fp8`` only: the lowest cosine to fp16, over a sample of the input measured
    before the run (gpuengine.fidelity), below which the run is refused (exit code 4)."""
    replicas_per_gpu: int = 1
    """Model replicas per device (``--replicas-per-gpu``), each with its own worker thread,
    CUDA streams and pinned buffers, all fed by the one scheduler; the replicas of one GPU
    share its read-only weights (at fp8: quantized once) and split its free memory (on the
    CPU: its threads)."""
    input_process: bool | None = None
    """Read, normalise, hash and tokenize the FASTA input in a child process (off the engine's
    GIL) — True: always, False: never (in the planner thread), None: the environment's
    choice, else only for inputs of at least ``inputs.INPUT_PROCESS_MIN_RECORDS`` records."""
    shard: Shard | None = None
    """``--shard I/N``: embed only the input's records of this shard (:mod:`gpuengine.shards`)."""
    writers: int | None = 1
    """``--writers N``: store writer processes, each writing one part store of ``out``, which
    becomes a directory of N stores when N > 1 (:mod:`gpuengine.store.parts`); None (what
    ``embed`` passes unless told): the number ``out`` already holds, else 1 (one file). N > 1
    pays where the writer limits a run (``RunSummary.store_bound``). Runs that commit records
    with their last embeddings (the daemon) and ``predict`` keep 1."""
    env: Environment = field(default_factory=environment)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise UsageError("no input FASTA files given")
        if not self.layers:
            raise UsageError("--layers needs at least one layer")
        if not self.pools:
            raise UsageError("--pool needs at least one mode")
        for pool in self.pools:
            if pool not in POOLS:
                raise UsageError(f"--pool {pool!r} is not one of {', '.join(POOLS)}")
        if len(set(self.pools)) != len(self.pools) or len(set(self.layers)) != len(self.layers):
            raise UsageError("--layers and --pool must not repeat a value")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.store_dtype not in STORE_DTYPES:
            raise UsageError(f"--store-dtype {self.store_dtype!r} is not one of "
                             f"{', '.join(STORE_DTYPES)}")
        if self.max_residues is not None and self.max_residues < 1 and self.max_residues != -1:
            raise UsageError(f"--max-residues must be at least 1, or 0 for never "
                             f"(got {self.max_residues})")
        check_table_name(self.table)
        if self.max_tokens is not None and self.max_tokens < 8:
            raise UsageError(f"--max-tokens must be at least 8 (got {self.max_tokens})")
        if not -1.0 <= self.fp8_min_cosine <= 1.0:
            raise UsageError(f"--fp8-min-cosine {self.fp8_min_cosine}: a cosine lies in [-1, 1]")
        if self.commit_every < 1:
            raise UsageError("commit_every must be at least 1")
        check_replicas_per_gpu(self.replicas_per_gpu)
        if self.writers is not None and (isinstance(self.writers, bool)
                                         or not isinstance(self.writers, int)
                                         or not 1 <= self.writers <= MAX_WRITERS):
            raise UsageError(f"--writers must be 1 to {MAX_WRITERS} (got {self.writers!r})")

    @property
    def input_in_processes(self) -> bool | None:
        """Whether the input is read (and its first pass shared) in child processes: this
        config's :attr:`input_process`, else the environment's; None: by input size."""
        if self.input_process is not None:
            return self.input_process
        return self.env.input_process

    def effective_max_residues(self, family_default: int | None) -> int | None:
        return family_default if self.max_residues == -1 else self.max_residues


MAX_REPLICAS_PER_GPU = 16
MAX_WRITERS = 16
"""The most store writer processes (part stores) of one run (``--writers``)."""


def check_replicas_per_gpu(value: int) -> None:
    """``--replicas-per-gpu`` must be 1 to :data:`MAX_REPLICAS_PER_GPU`."""
    if not isinstance(value, int) or not 1 <= value <= MAX_REPLICAS_PER_GPU:
        raise UsageError(f"--replicas-per-gpu must be 1 to {MAX_REPLICAS_PER_GPU} "
                         f"(got {value!r})")
