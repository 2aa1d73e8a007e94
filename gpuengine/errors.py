"""The error tree.

Every error a user can cause (bad input, a model that cannot be found, a store that does not
match) derives from :class:`GpuEngineError` and carries the process exit code the CLI uses.
Broken invariants are :class:`InternalError` and say that they are a bug.

Exit codes (documented in the README and ``gpuengine --help``):

==== =====================================================================
code meaning
==== =====================================================================
0    every requested sequence is in the store
1    error: bad input, model or store problem; nothing new was committed
     for the failing step, what was committed earlier is intact
2    usage error (bad option or argument)
3    partial: the run finished, but some sequences failed (reported)
4    refused: a lossy precision (fp8) changed a sample of the input more
     than ``--fp8-min-cosine`` allows; nothing was written
130  interrupted (Ctrl-C / SIGTERM) after a clean drain; rerun to resume
==== =====================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_FIDELITY = 4
EXIT_INTERRUPTED = 130


class GpuEngineError(Exception):
    """Base class of every error gpuengine raises on purpose."""

    exit_code = EXIT_ERROR


class UsageError(GpuEngineError):
    """A bad option value or combination."""

    exit_code = EXIT_USAGE


class InputError(GpuEngineError):
    """An input file cannot be read, is not FASTA, or holds invalid records."""


class ModelLoadError(GpuEngineError):
    """A model cannot be found, downloaded or loaded."""


class DeviceError(GpuEngineError):
    """A device cannot be used (missing, out of memory beyond recovery, died)."""


class FidelityError(GpuEngineError):
    """A lossy precision (fp8) changes this run's embeddings more than the user accepts
    (``--fp8-min-cosine``), measured on a sample of the input before anything was written."""

    exit_code = EXIT_FIDELITY


class StoreError(GpuEngineError):
    """The LMDB store cannot be opened or written."""


class StoreMismatchError(StoreError):
    """The store holds embeddings of another model, layer, pooling or dtype."""


class NotInStoreError(UsageError, KeyError):
    """A table or output was named (``--table``, ``--layer``, ``--pool``) that the store does
    not hold. Also a KeyError, for library callers of :class:`~gpuengine.EmbeddingStore`."""

    __str__ = Exception.__str__  # KeyError's str() would quote the message


class AmbiguousChoiceError(UsageError, ValueError):
    """The store holds several tables (or a table several outputs) and the choice is not
    given. Also a ValueError, for library callers."""


class InternalError(GpuEngineError):
    """A broken invariant: this is a bug in gpuengine, please report it."""

    def __init__(self, message: str):
        super().__init__(f"{message} (this is a bug in gpuengine; please report it)")
