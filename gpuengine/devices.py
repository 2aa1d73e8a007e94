"""Which devices to run on, what they are, and their starting token budgets.

CUDA ordinals are mapped to NVML handles by UUID, never by index: NVML lists every GPU in PCI
order and ignores ``CUDA_VISIBLE_DEVICES``, so index-based lookup reads the wrong card. Without
NVML (no driver, MIG, containers) everything degrades to the allocator's own numbers.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import torch

from gpuengine.budget import (DEFAULT_CPU_MAX_TOKENS, DEFAULT_GPU_MAX_TOKENS, TokenBudget,
                              memory_budget)
from gpuengine.errors import DeviceError, UsageError

log = logging.getLogger(__name__)

GPU_MARGIN_BYTES = 2 << 30
"""Memory left free on every GPU for the CUDA context, the allocator and other processes."""


@dataclass(frozen=True)
class DeviceInfo:
    device: str
    """``cpu`` or ``cuda:N``."""
    name: str
    total_bytes: int | None
    free_bytes: int | None
    memory_source: str
    """``nvml``, ``torch`` or ``host``."""
    uuid: str | None = None


def parse_devices(spec: str) -> list[torch.device]:
    """``auto`` (all GPUs, else CPU), ``cpu``, ``all`` (all GPUs, error if none) or ``0,1``."""
    spec = spec.strip().lower()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "cpu":
        return [torch.device("cpu")]
    if spec == "auto":
        return [torch.device("cuda", i) for i in range(count)] or [torch.device("cpu")]
    if spec == "all":
        if not count:
            raise DeviceError("--gpus all: no CUDA GPU is visible (use --gpus cpu to run on the CPU)")
        return [torch.device("cuda", i) for i in range(count)]
    try:
        ordinals = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--gpus {spec!r}: expected auto, all, cpu or ordinals like 0,1") from None
    if not ordinals or len(set(ordinals)) != len(ordinals):
        raise UsageError(f"--gpus {spec!r}: give each GPU ordinal once")
    for ordinal in ordinals:
        if not 0 <= ordinal < count:
            raise DeviceError(f"--gpus {spec!r}: GPU {ordinal} is not visible "
                              f"({count} visible; CUDA_VISIBLE_DEVICES="
                              f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return [torch.device("cuda", i) for i in ordinals]


class MemoryProbe:
    """Free memory of one CUDA device: NVML (memory info v2, handle looked up by UUID) when it
    answers, else the allocator's ``mem_get_info``. Initialised once, read from one thread."""

    def __init__(self, device: torch.device):
        self.device = device
        self.source = "torch"
        self.uuid: str | None = None
        self._handle = None
        self._pynvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.uuid = "GPU-" + str(torch.cuda.get_device_properties(device).uuid)
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(self.uuid)
            self._pynvml = pynvml
            self.total_and_free()
            self.source = "nvml"
        except Exception as exc:  # no driver library, MIG, not supported, old driver, ...
            log.debug("NVML unavailable for %s (%s); using the allocator's numbers", device, exc)
            self._handle = None

    def total_and_free(self) -> tuple[int, int]:
        if self._handle is not None:
            nv = self._pynvml
            try:
                info = nv.nvmlDeviceGetMemoryInfo(self._handle, version=nv.nvmlMemory_v2)
            except (nv.NVMLError, TypeError, AttributeError):
                info = nv.nvmlDeviceGetMemoryInfo(self._handle)
            return int(info.total), int(info.free)
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total), int(free)


def describe(device: torch.device) -> DeviceInfo:
    if device.type == "cpu":
        total = _host_memory()
        return DeviceInfo("cpu", f"CPU ({os.cpu_count()} cores)", total, None, "host")
    props = torch.cuda.get_device_properties(device)
    probe = MemoryProbe(device)
    total, free = probe.total_and_free()
    return DeviceInfo(str(device), props.name, total, free, probe.source, probe.uuid)


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def initial_budget(device: torch.device, bytes_per_token: int, max_tokens: int | None) -> TokenBudget:
    """A device's starting budget: memory-derived on GPUs, a fixed size on the CPU."""
    if device.type == "cpu":
        cap = max_tokens or DEFAULT_CPU_MAX_TOKENS
        return TokenBudget(cap, cap)
    _, free = MemoryProbe(device).total_and_free()
    tokens = memory_budget(free, bytes_per_token, GPU_MARGIN_BYTES)
    return TokenBudget(tokens, max_tokens or DEFAULT_GPU_MAX_TOKENS)


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
    stats: object | None = None
    """The device worker's stats (``largest_batch`` since the last refresh is read and reset)."""

    def refresh(self, margin: int = GPU_MARGIN_BYTES) -> None:
        """Re-read free memory and the allocator's peak; set the budget's memory limit.

        usable = free (NVML) + reserved by our allocator − baseline − margin: our own cached
        blocks are usable by the next batch, memory another process takes is not."""
        self.total_bytes, self.free_bytes = self.probe.total_and_free()
        reserved = torch.cuda.memory_reserved(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - self.baseline_bytes
        largest = getattr(self.stats, "largest_batch", 0)
        if largest:
            # with up to `depth` batches in flight the peak is an upper bound: budgets only shrink
            self.bytes_per_token = max(self.bytes_per_token, peak // largest)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.stats.largest_batch = 0
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


def model_width(model: str) -> int:
    """The hidden size ``d`` of ``model``: from the known shapes for a published name
    (esm2_t6_8M_UR50D … esm2_t48_15B_UR50D, zhihan1996/DNABERT-S; no weight file needed), else
    from the weights it names. A path that exists is always read, never taken for a name."""
    from pathlib import Path

    from gpuengine.models.registry import family
    from gpuengine.models.sources import DNABERT_HUB_NAMES, resolve
    from gpuengine.synthetic import DNABERT_S_SHAPE, ESM2_SHAPES

    if not Path(model).expanduser().exists():
        if model in ESM2_SHAPES:
            return ESM2_SHAPES[model][1]
        if model in DNABERT_HUB_NAMES:
            return DNABERT_S_SHAPE[1]
    source = resolve(model, allow_download=False)
    return family(source.family).read(source).embed_dim


def budget_explanation(model: str, precision: str, infos: list[DeviceInfo]) -> dict[str, dict]:
    """The starting token budget each device in ``infos`` would get for ``model``, and why (the
    engine refines bytes per token at warm-up from the allocator's peak). Needs only the
    model's width: a published name works without its weights."""
    from gpuengine.budget import activation_bytes_per_token
    from gpuengine.vocabulary import PRECISION_BYTES, PRECISIONS

    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    dim = model_width(model)
    per_token = activation_bytes_per_token(dim, PRECISION_BYTES[precision], 1)
    out = {}
    for info in infos:
        if info.device == "cpu":
            out["cpu"] = {"tokens": DEFAULT_CPU_MAX_TOKENS,
                          "why": f"fixed on the CPU (--max-tokens sets it); d={dim}"}
            continue
        tokens = memory_budget(info.free_bytes or 0, per_token, GPU_MARGIN_BYTES)
        capped = min(tokens, DEFAULT_GPU_MAX_TOKENS)
        why = (f"{(info.free_bytes or 0) / 2**30:.1f} GiB free ({info.memory_source}) − "
               f"{GPU_MARGIN_BYTES / 2**30:.0f} GiB margin over ~{per_token / 1024:.0f} KiB per "
               f"token (d={dim}, {precision}, estimate) = {tokens:,} tokens")
        if capped < tokens:
            why += (f"; capped at {DEFAULT_GPU_MAX_TOKENS:,} (tokens/s stops rising above "
                    "32-64k tokens per batch on an H200: docs/benchmarks.md)")
        out[info.device] = {"tokens": capped, "why": why}
    return out
