"""Model replicas that outlive one run.

A :class:`ReplicaPool` keeps each built, warmed-up replica (runner, token budget, memory
telemetry) keyed by what makes it reusable: the weights' checksum, the outputs, the device and
the precision. The daemon and the ``predict`` workflow hand one pool to every run, so models
load once per process; a plain ``gpuengine embed`` uses none.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Hashable


@dataclass
class Replica:
    runner: Any
    budget: Any
    memory: Any = None
    """The device's :class:`~gpuengine.devices.DeviceMemory` (GPUs only)."""


class ReplicaPool:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replicas: dict[Hashable, Replica] = {}
        self._weights: dict[Hashable, Any] = {}

    def weights(self, key: Hashable, read: Any) -> Any:
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

    def memories(self) -> list:
        with self._lock:
            return [r.memory for r in self._replicas.values() if r.memory is not None]

    def clear(self) -> None:
        """Drop every replica (their device memory is freed once nothing else holds them)."""
        with self._lock:
            self._replicas.clear()
            self._weights.clear()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
