"""Which devices to run on, what they are, and their starting token budgets.

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


def nvml_memory(device: torch.device) -> tuple[int, int, str] | None:
    """(total, free, uuid) from NVML memory info v2, looked up by the device's UUID."""
    try:
        import pynvml

        pynvml.nvmlInit()
        uuid = "GPU-" + str(torch.cuda.get_device_properties(device).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        except (pynvml.NVMLError, TypeError, AttributeError):
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.total), int(info.free), uuid
    except Exception as exc:  # NVML missing, driver too old, MIG, not supported, ...
        log.debug("NVML unavailable for %s: %s", device, exc)
        return None


def describe(device: torch.device) -> DeviceInfo:
    if device.type == "cpu":
        total = _host_memory()
        return DeviceInfo("cpu", f"CPU ({os.cpu_count()} cores)", total, None, "host")
    props = torch.cuda.get_device_properties(device)
    nvml = nvml_memory(device)
    if nvml:
        total, free, uuid = nvml
        return DeviceInfo(str(device), props.name, total, free, "nvml", uuid)
    free, total = torch.cuda.mem_get_info(device)
    return DeviceInfo(str(device), props.name, total, free, "torch")


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
    info = describe(device)
    tokens = memory_budget(info.free_bytes or 0, bytes_per_token, GPU_MARGIN_BYTES)
    return TokenBudget(tokens, max_tokens or DEFAULT_GPU_MAX_TOKENS)
