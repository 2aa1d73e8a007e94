"""Model replicas: built and warmed up on every device of a run, kept across runs, watched.

A :class:`Replica` is one model on one device (its :class:`~gpuengine.runner.Runner`), the
device's :class:`~gpuengine.budget.TokenBudget` and, on a GPU, its :class:`DeviceMemory`.
:func:`build_replicas` makes one per device of a run:

1. the run's precision (:func:`run_precision`) and the device list (``--gpus``);
2. per device, a replica from the :class:`ReplicaPool` when one fits (same weights, outputs,
   device, precision, ``--max-tokens`` and runner factory), else a new one: the model is
   built from the host-side weights, the budget starts from the device's free memory, and on
   a GPU one batch at the full budget runs before any input is claimed (memory problems show
   at start, kernels compile now) and calibrates bytes per token from the allocator's peak.

While a run embeds, :class:`MemoryTelemetry` re-reads every GPU's memory once a second and
sets each budget's memory limit, from the largest batch the device worker reported to the
budget since the last look (:meth:`~gpuengine.budget.TokenBudget.take_largest_batch`).

A lossy precision (``fp8``, :data:`~gpuengine.vocabulary.GUARDED_PRECISIONS`) is checked
twice: before anything is read, that the model family and every device run it
(:func:`check_precision`); once the replicas are built and before any worker starts, what it
does to a sample of the run's own input against fp16 (:func:`guard_fidelity`, the fidelity
guard of :mod:`gpuengine.fidelity`), refusing the run below ``--fp8-min-cosine``.

The daemon and the ``predict`` workflow hand one pool to every run, so models load once per
process; a plain ``gpuengine embed`` uses none. Nothing here touches the store or the
scheduler.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

import torch

from gpuengine.budget import TokenBudget, activation_bytes_per_token, memory_budget
from gpuengine.config import EmbedConfig
from gpuengine.devices import GPU_MARGIN_BYTES, MemoryProbe, initial_budget, parse_devices
from gpuengine.errors import DeviceError
from gpuengine.models.registry import Family, Weights, family
from gpuengine.models.sources import ModelSource, resolve, weights_checksum
from gpuengine.progress import ProgressSink
from gpuengine.runner import DTYPES, Runner
from gpuengine.store.schema import OutputSpec, TableSpec
from gpuengine.vocabulary import GUARDED_PRECISIONS, PRECISION_BYTES

if TYPE_CHECKING:
    from gpuengine.fidelity import FidelityReport
    from gpuengine.inputs import RecordSource
    from gpuengine.models.fp8 import Fp8Config

log = logging.getLogger(__name__)

RunnerFactory = Callable[[torch.device, str, tuple[OutputSpec, ...]], Runner]
"""``(device, precision, outputs) -> runner``: replaces the model runner (tests simulate
devices with it; the host benchmark measures the pipeline with a no-op runner)."""


@dataclass
class DeviceMemory:
    """What the telemetry thread knows about one GPU's memory."""

    device: torch.device
    budget: TokenBudget
    probe: MemoryProbe
    baseline_bytes: int
    """Allocated after the replica loaded: weights and fixed buffers."""
    bytes_per_token: int
    """Calibrated at start-up, raised when the allocator's peaks show more."""
    free_bytes: int = 0
    total_bytes: int = 0

    def refresh(self, margin: int = GPU_MARGIN_BYTES) -> None:
        """Re-read free memory and the allocator's peak; set the budget's memory limit.

        usable = free (NVML) + reserved by our allocator − baseline − margin: our own cached
        blocks are usable by the next batch, memory another process takes is not."""
        self.total_bytes, self.free_bytes = self.probe.total_and_free()
        reserved = torch.cuda.memory_reserved(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - self.baseline_bytes
        largest = self.budget.take_largest_batch()
        if largest:
            # with up to `depth` batches in flight the peak is an upper bound: budgets only shrink
            self.bytes_per_token = max(self.bytes_per_token, peak // largest)
            torch.cuda.reset_peak_memory_stats(self.device)
        usable = self.free_bytes + reserved - self.baseline_bytes - margin
        self.budget.set_memory_tokens(memory_budget(usable, self.bytes_per_token, 0))

    def describe(self) -> dict:
        return {"device": str(self.device), "memory_source": self.probe.source,
                "free_bytes": self.free_bytes, "total_bytes": self.total_bytes,
                "bytes_per_token": self.bytes_per_token, **self.budget.describe(),
                "budget_tokens": self.budget.tokens()}


class MemoryTelemetry(threading.Thread):
    """Re-reads every GPU's memory every ``period`` seconds so budgets shrink before a batch
    fails when another process takes memory (and grow back when it leaves)."""

    def __init__(self, memories: list[DeviceMemory], period: float = 1.0):
        super().__init__(name="gpuengine-telemetry", daemon=True)
        self.memories = memories
        self.period = period
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.period):
            for memory in self.memories:
                try:
                    memory.refresh()
                except Exception as exc:  # never let telemetry kill a run
                    log.debug("telemetry for %s failed: %s", memory.device, exc)

    def stop(self) -> None:
        """Stop the thread and wait for it (a refresh in progress finishes first)."""
        self.stop_event.set()
        if self.ident is not None:  # started
            self.join()


@dataclass
class Replica:
    runner: Runner
    budget: TokenBudget
    memory: DeviceMemory | None = None
    """The device's memory telemetry (GPUs only)."""


class ReplicaPool:
    """Built replicas and host-side weights, kept for the next run of the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replicas: dict[Hashable, Replica] = {}
        self._weights: dict[Hashable, Weights] = {}

    def weights(self, key: Hashable, read: Callable[[], Weights]) -> Weights:
        """The host-side weights for ``key`` (e.g. path, size, mtime), read once per process."""
        with self._lock:
            if key not in self._weights:
                self._weights[key] = read()
            return self._weights[key]

    def get(self, key: Hashable) -> Replica | None:
        with self._lock:
            return self._replicas.get(key)

    def put(self, key: Hashable, replica: Replica) -> None:
        with self._lock:
            self._replicas[key] = replica

    def memories(self) -> list[DeviceMemory]:
        with self._lock:
            return [r.memory for r in self._replicas.values() if r.memory is not None]

    def clear(self) -> None:
        """Drop every replica (their device memory is freed once nothing else holds them)."""
        with self._lock:
            self._replicas.clear()
            self._weights.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class ModelChoice:
    """The model a run uses, resolved before anything is read or loaded."""

    source: ModelSource
    fam: Family
    max_residues: int | None
    """The run's truncation (``--max-residues``, else the family's default)."""

    @classmethod
    def resolve(cls, config: EmbedConfig) -> ModelChoice:
        """``config.model`` as a file, directory or published name (downloaded when allowed)."""
        source = resolve(config.model,
                         allow_download=config.allow_download and not config.env.offline)
        fam = family(source.family)
        return cls(source, fam, config.effective_max_residues(fam.default_max_residues))

    def read_weights(self, pool: ReplicaPool | None) -> Weights:
        """The host-side weights: from ``pool`` when it read this file before."""
        if pool is None:
            return self.fam.read(self.source)
        stat = Path(self.source.path).stat()
        key = (str(Path(self.source.path).resolve()), stat.st_size, stat.st_mtime_ns)
        return pool.weights(key, lambda: self.fam.read(self.source))

    def checksum(self, cache_dir: Path) -> str:
        """The weights' sha256 (cached by path, size and time under ``cache_dir``)."""
        return weights_checksum(self.source, cache_dir)


def run_precision(config: EmbedConfig, fam: Family) -> tuple[str, str]:
    """The compute precision of a run and where it came from (for messages): ``--precision``,
    else fp32 on the CPU and the family's GPU precision (fp16) on GPUs. Part of the table's
    identity."""
    if config.precision is not None:
        return config.precision, ""
    if parse_devices(config.devices)[0].type == "cpu":
        return "fp32", " (the default on the CPU, as no --precision was given)"
    return fam.gpu_precision, " (the default on the GPU, as no --precision was given)"


def check_precision(precision: str, fam: Family, config: EmbedConfig) -> None:
    """Before anything is read: ``fp8`` is for ESM-2, on GPUs that run FP8 GEMMs (compute
    capability 8.9 or newer); a UsageError or DeviceError that says why otherwise."""
    if precision == "fp8":
        from gpuengine.models.fp8 import check_fp8_run

        check_fp8_run(fam.name, parse_devices(config.devices))


def build_replicas(config: EmbedConfig, fam: Family, weights: Weights, spec: TableSpec,
                   progress: ProgressSink, *, runner_factory: RunnerFactory | None = None,
                   pool: ReplicaPool | None = None) -> list[Replica]:
    """A warmed-up replica on every device of ``config`` computing ``spec``'s outputs in its
    precision (see the module docstring)."""
    outputs, precision = spec.outputs, spec.precision
    devices = parse_devices(config.devices)
    if devices[0].type == "cpu" and config.threads:
        torch.set_num_threads(config.threads)
    estimate = activation_bytes_per_token(weights.embed_dim, PRECISION_BYTES[precision],
                                          len(outputs))
    replicas = []
    for device in devices:
        key = (spec.model.sha256, outputs, str(device), precision, config.max_tokens,
               runner_factory)
        replica = pool.get(key) if pool is not None else None
        if replica is None:
            progress.stage(f"loading {weights.source.name} on {device} ({precision})")
            if runner_factory is not None:
                runner = runner_factory(device, precision, outputs)
            else:
                runner = _make_runner(config, fam, weights, device, precision, outputs)
            budget = initial_budget(device, estimate, config.max_tokens)
            memory = _warm_up(runner, budget, progress) if device.type == "cuda" else None
            replica = Replica(runner, budget, memory)
            if pool is not None:
                pool.put(key, replica)
        replicas.append(replica)
    return replicas


def _make_runner(config: EmbedConfig, fam: Family, weights: Weights, device: torch.device,
                 precision: str, outputs: tuple[OutputSpec, ...]) -> Runner:
    compile_kernels = config.compile if config.compile is not None else device.type == "cuda"
    return make_runner(fam, weights, device, precision, outputs, compile=compile_kernels)


def make_runner(fam: Family, weights: Weights, device: torch.device, precision: str,
                outputs: Sequence[OutputSpec], *, compile: bool, fp8: Fp8Config | None = None,
                fp8_on_cpu: bool = False) -> Runner:
    """A model of ``fam`` built from the host-side ``weights`` in ``precision``'s dtype, on
    ``device``, in a runner computing ``outputs``: the engine's fastest kernels where
    ``compile``, else the exact eager layers. For ``fp8`` the runner quantizes the chosen
    GEMMs' weights once (``fp8``: which GEMMs, default
    :data:`~gpuengine.models.fp8.DEFAULT_FP8`); ``fp8_on_cpu`` allows FP8's eager reference
    path on the CPU (``gpuengine check``, tests)."""
    model = fam.build(weights, DTYPES[precision])
    return Runner(model, device, precision, outputs, fam.pooling_rule, compile=compile,
                  fp8=fp8, fp8_on_cpu=fp8_on_cpu)


def guard_fidelity(config: EmbedConfig, fam: Family, weights: Weights, spec: TableSpec,
                   replica: Replica, records: RecordSource, encode: Callable, progress:
                   ProgressSink, *, runner_factory: RunnerFactory | None = None
                   ) -> FidelityReport | None:
    """For a guarded precision (fp8): the fidelity guard on ``replica`` (the run's first
    device), against an fp16 runner built on the same device for the measurement and dropped
    after it; FidelityError below ``config.fp8_min_cosine``. None (and nothing done) for any
    other precision. Call it before any worker starts: the guard uses the replica's runner
    from this thread, and the allocator's peak is reset after it so that the reference model
    does not count in the device's bytes per token."""
    if spec.precision not in GUARDED_PRECISIONS:
        return None
    from gpuengine.fidelity import GUARD_REFERENCE, guard_run

    device = replica.runner.device

    def reference() -> Runner:
        progress.stage(f"fidelity guard: building the {GUARD_REFERENCE} reference on {device}")
        if runner_factory is not None:
            return runner_factory(device, GUARD_REFERENCE, spec.outputs)
        return _make_runner(config, fam, weights, device, GUARD_REFERENCE, spec.outputs)

    report = guard_run(spec.precision, replica.runner, reference, records.iterate(),
                       records.count, encode, threshold=config.fp8_min_cosine,
                       max_residues=spec.max_residues, progress=progress)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return report


def _warm_up(runner: Runner, budget: TokenBudget, progress: ProgressSink) -> DeviceMemory:
    """Run one batch at the full budget before any input is claimed (memory problems show
    now, kernels compile now) and calibrate bytes per token from the allocator's peak."""
    baseline = torch.cuda.memory_allocated(runner.device)
    tokens = budget.tokens()
    while True:
        progress.stage(f"warming up {runner.device} at {tokens:,} tokens")
        failed = False
        try:
            bytes_per_token = runner.calibrate(tokens)
        except torch.cuda.OutOfMemoryError:
            failed = True  # recover outside the except block (its frame pins tensors)
        if not failed:
            break
        runner.release_cached_memory()
        if tokens <= 1024:
            raise DeviceError(f"{runner.device} cannot run even {tokens} tokens")
        budget.after_oom(tokens)
        tokens //= 2
    memory = DeviceMemory(runner.device, budget, MemoryProbe(runner.device), baseline,
                          bytes_per_token)
    memory.refresh()
    log.info("%s: %s", runner.device, memory.describe())
    return memory


def start_telemetry(replicas: list[Replica]) -> MemoryTelemetry | None:
    """The telemetry thread over the GPU replicas, started (None when there is none)."""
    memories = [r.memory for r in replicas if r.memory is not None]
    if not memories:
        return None
    telemetry = MemoryTelemetry(memories)
    telemetry.start()
    return telemetry
