"""Which devices to run on, what they are, and their starting token budgets (the telemetry
that adjusts budgets during a run is in :mod:`gpuengine.replicas`).

CUDA ordinals are mapped to NVML handles by UUID, never by index: NVML lists every GPU in PCI
order and ignores ``CUDA_VISIBLE_DEVICES``, so index-based lookup reads the wrong card. Without
NVML (no driver, MIG, containers) everything degrades to the allocator's own numbers.
"""

from __future__ import annotations

import logging
import os
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
