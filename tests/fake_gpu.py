"""A simulated GPU for the replicas' memory telemetry (no CUDA needed): NVML's free memory
(:class:`FakeProbe`), the caching allocator's figures (:class:`FakeAllocator`) and a runner
that calibrates like the real one (:class:`FakeGpuRunner`); :func:`device_group` builds one
device's replicas on it as ``gpuengine.replicas`` does. Install the probe and allocator with
:func:`install` (test_replicas_per_gpu.py, test_replica_telemetry_window.py)."""

from __future__ import annotations

import torch

GIB = 1 << 30


class FakeGpu:
    """One GPU as NVML and the caching allocator would report it: weights, activations of
    the batch now running, and each replica's cached (reserved, unused) blocks."""

    def __init__(self, total=80 * GIB, other=0):
        self.total, self.other = total, other
        self.weights = 0
        self.running = 0
        self.cached: dict[int, int] = {}
        self.peak = 0
        self.log: list[tuple[int, int, int]] = []
        """(replica, tokens asked, bytes NVML showed free just before) per calibration."""

    def reserved(self) -> int:
        return self.weights + self.running + sum(self.cached.values())

    def free(self) -> int:
        return self.total - self.other - self.reserved()


class FakeProbe:
    source = "nvml"

    def __init__(self, gpu: FakeGpu):
        self.gpu = gpu

    def total_and_free(self):
        return self.gpu.total, self.gpu.free()


class FakeAllocator:
    def __init__(self, gpu: FakeGpu):
        self.gpu = gpu

    def allocated(self):
        return self.gpu.weights + self.gpu.running

    def reserved(self):
        return self.gpu.reserved()

    def peak_allocated(self):
        return self.gpu.peak

    def reset_peak(self):
        self.gpu.peak = self.allocated()


class FakeGpuRunner:
    """Calibrates like the real runner: one batch of ``tokens`` at ``per_token`` bytes, which
    runs out of memory when it does not fit in what is free (its own cache counts as free)."""

    cuda = True

    def __init__(self, gpu: FakeGpu, index: int, per_token: int):
        self.gpu, self.index, self.per_token = gpu, index, per_token
        self.device = torch.device("cuda", 0)

    def calibrate(self, tokens: int) -> int:
        gpu = self.gpu
        need = tokens * self.per_token
        gpu.log.append((self.index, tokens, gpu.free()))
        mine = gpu.cached.pop(self.index, 0)
        others = sum(gpu.cached.values())
        if need > gpu.free() + mine + others:  # the allocator frees every cache, then gives up
            gpu.cached[self.index] = mine
            raise torch.cuda.OutOfMemoryError("simulated")
        gpu.cached = {k: v for k, v in gpu.cached.items()  # caches it had to release
                      if need <= gpu.free() + mine or k == self.index}
        gpu.running = need
        gpu.peak = max(gpu.peak, gpu.weights + need)
        gpu.running = 0
        gpu.cached[self.index] = max(mine, need)
        return self.per_token

    def release_cached_memory(self):
        self.gpu.cached.clear()


def install(monkeypatch) -> FakeGpu:
    """A fresh :class:`FakeGpu` whose probe and allocator ``gpuengine.replicas`` uses."""
    import gpuengine.replicas as replicas

    gpu = FakeGpu()
    monkeypatch.setattr(replicas, "MemoryProbe", lambda device: FakeProbe(gpu))
    monkeypatch.setattr(replicas, "CudaAllocator", lambda device: FakeAllocator(gpu))
    return gpu


def device_group(gpu, count, per_token, estimate, max_tokens):
    from gpuengine.progress import NullProgress
    from gpuengine.replicas import _device_group

    gpu.weights = 3 * GIB  # one copy, shared by the replicas
    runners = [FakeGpuRunner(gpu, r, per_token) for r in range(count)]
    names = [f"cuda:0#{r}" for r in range(count)]
    return _device_group(runners, names, torch.device("cuda", 0), estimate, max_tokens,
                         NullProgress())
