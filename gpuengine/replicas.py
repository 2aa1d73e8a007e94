"""Model replicas: built and warmed up on every device of a run, kept across runs, watched.

A :class:`Replica` is one model on one device (its :class:`~gpuengine.runner.Runner`) and its
:class:`~gpuengine.budget.TokenBudget`; on a GPU also the device's :class:`DeviceMemory`.
:func:`build_replicas` makes ``--replicas-per-gpu`` R of them per device of a run (Triton
Inference Server's *instance groups*), each later driven by its own device worker thread
with its own CUDA streams and pinned buffers, all fed by the one scheduler:

1. the run's precision (:func:`run_precision`) and the device list (``--gpus``);
2. per device, its replicas from the :class:`ReplicaPool` when they fit (same weights,
   outputs, device, precision, ``--max-tokens``, R and runner factory), else new ones: the
   model is built once from the host-side weights and its device copy is shared by the
   device's R runners (the forward only reads it; at ``fp8`` the first runner quantizes its
   weights, once, and the others run that quantized copy); on the CPU each replica gets a fixed
   budget and 1/R of the threads (:func:`split_cpu_threads`); on a GPU the replicas' budgets
   are equal shares of one :class:`DeviceMemory`, and each replica in turn runs one batch at
   its full share before any input is claimed (memory problems show at start, kernels
   compile now), calibrating bytes per token from the allocator's peak.

While a run embeds, :class:`MemoryTelemetry` re-reads every GPU's memory once a second and
sets each share, from the largest batches the device workers reported to the budgets since
the last look (:meth:`~gpuengine.budget.TokenBudget.take_largest_batch`). An out-of-memory
error lowers only the budget of the replica that hit it (its learned cap, in the device
worker): the others keep theirs, and the next look at the device's memory resizes every share
(an OOM caused by another process shows there; one caused by a bad estimate is learned by
each replica that meets it, once, instead of every replica halving at the first).

A lossy precision (``fp8``, :data:`~gpuengine.vocabulary.GUARDED_PRECISIONS`) is checked
twice: before anything is read, that the model family and every device run it
(:func:`check_precision`); once the replicas are built and before any worker starts, what it
does to a sample of the run's own input against fp16 (:func:`guard_fidelity`, the fidelity
guard of :mod:`gpuengine.fidelity`), refusing the run below ``--fp8-min-cosine``. The guard
runs once, on the first replica (a device's R replicas share its quantized model), against an
fp16 model of its own that is dropped after the measurement.

The daemon and the ``predict`` workflow hand one pool to every run, so models load once per
process; a plain ``gpuengine embed`` uses none. Nothing here touches the store or the
scheduler.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

import torch

from gpuengine.budget import (DEFAULT_GPU_MAX_TOKENS, MIN_TOKENS, TokenBudget,
                              activation_bytes_per_token, memory_budget)
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


class CudaAllocator:
    """The caching allocator's figures for one device (one per process: every replica and
    stream of the device shares it)."""

    def __init__(self, device: torch.device):
        self.device = device

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def peak_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)


@dataclass
class DeviceMemory:
    """One GPU's memory as the telemetry thread sees it, and the token budgets of the
    replicas on it: each replica gets an equal share of what is usable, so the budgets of a
    device's replicas never count the same free bytes twice.

    usable = free (NVML) + reserved by this process's allocator − baseline − margin: our own
    cached blocks are usable by the next batch (blocks cached for another replica's stream
    are released by the allocator when an allocation needs them), memory another process
    takes is not. Each of the R shares is usable / R over bytes per token."""

    device: torch.device
    probe: MemoryProbe
    baseline_bytes: int
    """Allocated once the device's replicas were loaded: weights and fixed buffers."""
    bytes_per_token: int
    """The estimate, then the largest warm-up calibration, raised when the allocator's peaks
    show more."""
    allocator: CudaAllocator | None = None
    budgets: list[TokenBudget] = field(default_factory=list)
    """One per replica, in replica order."""
    names: list[str] = field(default_factory=list)
    free_bytes: int = 0
    total_bytes: int = 0
    usable_bytes: int = 0

    def __post_init__(self) -> None:
        if self.allocator is None:
            self.allocator = CudaAllocator(self.device)

    def add_share(self, name: str, maximum: int) -> TokenBudget:
        """A new replica's budget (its share is set by the next :meth:`refresh`)."""
        budget = TokenBudget(MIN_TOKENS, maximum)
        self.budgets.append(budget)
        self.names.append(name)
        return budget

    def refresh(self, margin: int = GPU_MARGIN_BYTES) -> None:
        """Re-read free memory and the allocator's peak; set every replica's memory share.

        The peak since the last look over the sum of the replicas' largest batches since
        then is at most the true bytes per token (batches that did not run at the same time
        are counted together), so it only ever raises the figure on evidence."""
        self.total_bytes, self.free_bytes = self.probe.total_and_free()
        reserved = self.allocator.reserved()
        largest = sum(budget.take_largest_batch() for budget in self.budgets)
        if largest:
            # with up to `depth` batches in flight the peak is an upper bound: budgets only shrink
            peak = self.allocator.peak_allocated() - self.baseline_bytes
            self.bytes_per_token = max(self.bytes_per_token, peak // largest)
            self.allocator.reset_peak()
        self.usable_bytes = max(0, self.free_bytes + reserved - self.baseline_bytes - margin)
        share = self.share_tokens()
        for budget in self.budgets:
            budget.set_memory_tokens(share)

    def share_tokens(self) -> int:
        """Tokens one replica's share of the usable memory holds."""
        return memory_budget(self.usable_bytes // max(1, len(self.budgets)),
                             self.bytes_per_token, 0)

    def describe(self) -> dict:
        replicas = [{"name": name, **budget.describe(), "budget_tokens": budget.tokens()}
                    for name, budget in zip(self.names, self.budgets)]
        out = {"device": str(self.device), "memory_source": self.probe.source,
               "free_bytes": self.free_bytes, "total_bytes": self.total_bytes,
               "usable_bytes": self.usable_bytes, "bytes_per_token": self.bytes_per_token}
        if len(replicas) == 1:  # one replica: its budget's fields, as before replicas
            out.update(replicas[0])
            del out["name"]
        out["budget_tokens"] = sum(r["budget_tokens"] for r in replicas)
        out["replicas"] = replicas
        return out


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
    """The device's memory telemetry (GPUs only), shared by the device's replicas."""
    name: str = ""
    """``cuda:0``, or ``cuda:0#1`` for the second of several replicas on one device."""


class ReplicaPool:
    """Built replicas and host-side weights, kept for the next run of the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replicas: dict[Hashable, list[Replica]] = {}
        self._weights: dict[Hashable, Weights] = {}
        self._reading: dict[Hashable, threading.Lock] = {}
        self._built: dict[tuple[int, torch.dtype], list[torch.nn.Module]] = {}

    def weights(self, key: Hashable, read: Callable[[], Weights]) -> Weights:
        """The host-side weights for ``key`` (e.g. path, size, mtime), read once per process
        (a thread reading one model's weights does not hold up another's)."""
        with self._lock:
            if key in self._weights:
                return self._weights[key]
            reading = self._reading.setdefault(key, threading.Lock())
        with reading:
            with self._lock:
                if key in self._weights:
                    return self._weights[key]
            value = read()
            with self._lock:
                self._weights[key] = value
            return value

    def has_weights(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._weights

    def put_built(self, weights: Weights, dtype: torch.dtype, model: torch.nn.Module) -> None:
        """A model built ahead from ``weights`` in ``dtype`` (on the host, by
        :mod:`gpuengine.preload`), for the next :meth:`take_built`."""
        with self._lock:
            self._built.setdefault((id(weights), dtype), []).append(model)

    def take_built(self, weights: Weights, dtype: torch.dtype) -> torch.nn.Module | None:
        """A model built ahead from ``weights`` in ``dtype``, handed out once, or None."""
        with self._lock:
            models = self._built.get((id(weights), dtype))
            return models.pop() if models else None

    def drop_built(self) -> None:
        """Forget the models built ahead that no run took."""
        with self._lock:
            self._built.clear()

    def get(self, key: Hashable) -> list[Replica] | None:
        """The replicas of one device built for ``key``, or None."""
        with self._lock:
            return self._replicas.get(key)

    def put(self, key: Hashable, replicas: list[Replica]) -> None:
        with self._lock:
            self._replicas[key] = replicas

    def memories(self) -> list[DeviceMemory]:
        """Each GPU's memory telemetry once (its replicas share it)."""
        with self._lock:
            found = {id(r.memory): r.memory for group in self._replicas.values()
                     for r in group if r.memory is not None}
        return list(found.values())

    def clear(self) -> None:
        """Drop every replica (their device memory is freed once nothing else holds them)."""
        with self._lock:
            self._replicas.clear()
            self._weights.clear()
            self._built.clear()
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
        return pool.weights(self.weights_key(), lambda: self.fam.read(self.source))

    def weights_key(self) -> tuple[str, int, int]:
        """The weights' key in a :class:`ReplicaPool`: path, size, mtime."""
        stat = Path(self.source.path).stat()
        return (str(Path(self.source.path).resolve()), stat.st_size, stat.st_mtime_ns)

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
    """``config.replicas_per_gpu`` warmed-up replicas on every device of ``config``, computing
    ``spec``'s outputs in its precision (see the module docstring)."""
    outputs, precision = spec.outputs, spec.precision
    devices = parse_devices(config.devices)
    count = config.replicas_per_gpu
    if devices[0].type == "cpu":
        split_cpu_threads(config.threads, count)
    estimate = activation_bytes_per_token(weights.embed_dim, PRECISION_BYTES[precision],
                                          len(outputs))
    replicas = []
    for device in devices:
        key = (spec.model.sha256, outputs, str(device), precision, config.max_tokens, count,
               runner_factory)
        group = pool.get(key) if pool is not None else None
        if group is None:
            names = [str(device)] if count == 1 else [f"{device}#{r}" for r in range(count)]
            runners, model = [], None
            for name in names:
                progress.stage(f"loading {weights.source.name} on {name} ({precision})")
                if runner_factory is not None:
                    runners.append(runner_factory(device, precision, outputs))
                else:  # the replicas of a device share one copy of the (read-only) weights;
                    # at fp8 the first runner quantizes it, the others run that quantized copy
                    if model is None:
                        model = build_model(fam, weights, DTYPES[precision], pool)
                    runners.append(_make_runner(config, fam, model, device, precision, outputs))
            group = _device_group(runners, names, device, estimate, config.max_tokens, progress)
            if pool is not None:
                pool.put(key, group)
        replicas.extend(group)
    return replicas


def build_model(fam: Family, weights: Weights, dtype: torch.dtype,
                pool: ReplicaPool | None) -> torch.nn.Module:
    """``fam.build(weights, dtype)``, or the same model built ahead into ``pool``."""
    built = pool.take_built(weights, dtype) if pool is not None else None
    return built if built is not None else fam.build(weights, dtype)


def _device_group(runners: list[Runner], names: list[str], device: torch.device,
                  estimate: int, max_tokens: int | None,
                  progress: ProgressSink) -> list[Replica]:
    """The replicas of one device: fixed budgets on the CPU; on a GPU, shares of one
    :class:`DeviceMemory`, each replica warmed up in turn (so each calibration runs alone and
    sees the memory the others hold: weights, cached blocks)."""
    if device.type != "cuda":
        return [Replica(runner, initial_budget(device, estimate, max_tokens), None, name)
                for runner, name in zip(runners, names)]
    allocator = CudaAllocator(device)
    memory = DeviceMemory(device, MemoryProbe(device), allocator.allocated(), estimate,
                          allocator)
    budgets = [memory.add_share(name, max_tokens or DEFAULT_GPU_MAX_TOKENS) for name in names]
    memory.refresh()  # shares from the estimate
    calibrated = 0
    for runner, budget, name in zip(runners, budgets, names):
        calibrated = max(calibrated, _warm_up(runner, budget, name, progress))
        memory.bytes_per_token = calibrated
        memory.refresh()  # the next replica's share sees this one's memory
    log.info("%s: %s", device, memory.describe())
    return [Replica(runner, budget, memory, name)
            for runner, budget, name in zip(runners, budgets, names)]


_cpu_split: tuple[int, int] | None = None
"""(threads per replica set by :func:`split_cpu_threads`, the total they were split from)."""


def split_cpu_threads(threads: int | None, replicas: int) -> None:
    """Give each of ``replicas`` CPU replicas its share of ``threads`` (None: torch's current
    count). torch's intra-op thread count is process-wide, and each worker thread runs its
    own OpenMP team of that size, so R replicas of total // R threads use the total."""
    global _cpu_split
    current = torch.get_num_threads()
    ours = _cpu_split is not None and _cpu_split[0] == current
    if threads is None and replicas == 1 and not ours:
        return  # torch's (or the caller's) setting, untouched
    total = threads or (_cpu_split[1] if ours else current)
    per = max(1, total // replicas)
    torch.set_num_threads(per)
    _cpu_split = (per, total)


def _make_runner(config: EmbedConfig, fam: Family, model: torch.nn.Module,
                 device: torch.device, precision: str, outputs: tuple[OutputSpec, ...], *,
                 fp8_on_cpu: bool = False, compile: bool | None = None) -> Runner:
    """A runner of ``model`` (built by the caller; at ``fp8`` quantized by the first runner of
    it, see :class:`~gpuengine.runner.Runner`) with the run's kernel choice (``compile``:
    another one)."""
    compile_kernels = config.compile if config.compile is not None else device.type == "cuda"
    if compile is not None:
        compile_kernels = compile
    return Runner(model, device, precision, outputs, fam.pooling_rule, compile=compile_kernels,
                  fp8_on_cpu=fp8_on_cpu)


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
                   ProgressSink, *, runner_factory: RunnerFactory | None = None,
                   pool: ReplicaPool | None = None,
                   reference_compiled: bool = False) -> FidelityReport | None:
    """For a guarded precision (fp8): the fidelity guard on ``replica`` (the run's first
    device), against an fp16 runner built on the same device for the measurement and dropped
    after it; FidelityError below ``config.fp8_min_cosine``. None (and nothing done) for any
    other precision. Call it before any worker starts: the guard uses the replica's runner
    from this thread, and the allocator's peak is reset after it so that the reference model
    does not count in the device's bytes per token.

    The fp16 reference runs the model's exact eager layers (``reference_compiled``: the run's
    kernel choice instead, for comparison): it embeds 256 sequences once, and the compiled
    kernels' compilation and autotuning for a precision the run does not otherwise use would
    be most of its time."""
    if spec.precision not in GUARDED_PRECISIONS:
        return None
    from gpuengine.fidelity import GUARD_REFERENCE, guard_run

    device = replica.runner.device

    def reference() -> Runner:
        progress.stage(f"fidelity guard: building the {GUARD_REFERENCE} reference on {device}")
        if runner_factory is not None:
            return runner_factory(device, GUARD_REFERENCE, spec.outputs)
        # its own model, never the replicas' (at fp8 those weights are quantized in place)
        model = build_model(fam, weights, DTYPES[GUARD_REFERENCE], pool)
        return _make_runner(config, fam, model, device, GUARD_REFERENCE, spec.outputs,
                            compile=None if reference_compiled else False)

    if records.pick is not None:  # the sample's records found directly, not by a full pass
        from gpuengine.fidelity import GUARD_SAMPLE, sample_indices

        picked = records.pick(sample_indices(records.count, GUARD_SAMPLE))
        sample, count = picked, len(picked)
    else:
        sample, count = records.iterate(), records.count
    report = guard_run(spec.precision, replica.runner, reference, sample,
                       count, encode, threshold=config.fp8_min_cosine,
                       max_residues=spec.max_residues, progress=progress)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return report


def _warm_up(runner: Runner, budget: TokenBudget, name: str, progress: ProgressSink) -> int:
    """Run one batch at the full budget before any input is claimed (memory problems show
    now, kernels compile now); returns the batch's bytes per token (the allocator's peak)."""
    while True:
        tokens = budget.tokens()
        progress.stage(f"warming up {name} at {tokens:,} tokens")
        failed = False
        try:
            bytes_per_token = runner.calibrate(tokens)
        except torch.cuda.OutOfMemoryError:
            failed = True  # recover outside the except block (its frame pins tensors)
        if not failed:
            return bytes_per_token
        runner.release_cached_memory()
        if tokens <= 1024:
            raise DeviceError(f"{name} cannot run even {tokens} tokens")
        budget.after_oom(tokens)
        budget.set_memory_tokens(tokens // 2)


def start_telemetry(replicas: list[Replica]) -> MemoryTelemetry | None:
    """The telemetry thread over the GPUs of ``replicas`` (each device once), started (None
    when there is none)."""
    memories = list({id(r.memory): r.memory for r in replicas if r.memory is not None}.values())
    if not memories:
        return None
    telemetry = MemoryTelemetry(memories)
    telemetry.start()
    return telemetry
