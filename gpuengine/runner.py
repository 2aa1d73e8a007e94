"""One model replica on one device: pack → forward → pool → host.

The runner knows nothing about scheduling or stores: it is given work items and returns
pooled fp32 vectors on the host, plus a per-item finiteness flag (a non-finite vector is never
stored). Its interface is the three calls a worker needs: :meth:`Runner.warm_up`,
:meth:`Runner.embed` and :attr:`Runner.device`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from gpuengine.models.attention import PackedLayout, select_attention
from gpuengine.packing import PackedBatch, WorkItem, pack
from gpuengine.pooling import PoolingIndex, PoolingRule, pool
from gpuengine.store.schema import OutputSpec

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class EmbeddedBatch:
    """Host results of one batch, in the order of its items."""

    vectors: dict[OutputSpec, list[np.ndarray]]
    """Per output: one fp32 array per item ((d,) pooled, (L, d) per-token)."""
    finite: np.ndarray
    """bool (N,): every value of the item's outputs is finite."""
    n_tokens: int
    seconds: float


class Runner:
    """Holds one replica; not thread-safe (one worker thread owns it)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str,
                 outputs: Sequence[OutputSpec], rule: PoolingRule, *, compile: bool = False):
        self.device = device
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.model = model.to(device)
        self.outputs = tuple(outputs)
        self.layers = sorted({o.layer for o in self.outputs})
        self.rule = rule
        self.attention = select_attention(device, self.dtype)
        self.padded = self.attention.needs_padding
        if compile and device.type == "cuda" and hasattr(self.model, "kernels"):
            from gpuengine.models.esm2 import compiled_kernels

            self.model.kernels = compiled_kernels()

    def release_cached_memory(self) -> None:
        """After an out-of-memory error (only then): give cached blocks back to the driver."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def warm_up(self, items: Sequence[WorkItem]) -> None:
        """One forward at full size, so memory problems show before any input is claimed."""
        self.embed(items)

    @torch.inference_mode()
    def embed(self, items: Sequence[WorkItem]) -> EmbeddedBatch:
        start = time.perf_counter()
        batch = pack(items)
        hidden = self._forward(batch)
        index = PoolingIndex.build(batch.lengths, self.rule)
        index_t = {name: torch.from_numpy(getattr(index, name)).to(self.device)
                   for name in ("body_rows", "body_lengths", "first_rows")}
        pooled = {o: pool(hidden[o.layer], index_t, o.pool) for o in self.outputs}
        finite = self._finite(pooled, index)
        host = {o: t.cpu().numpy() for o, t in pooled.items()}
        vectors = {o: self._split(o, arr, index) for o, arr in host.items()}
        return EmbeddedBatch(vectors, finite, batch.n_tokens, time.perf_counter() - start)

    def _forward(self, batch: PackedBatch) -> dict[int, torch.Tensor]:
        ids = torch.from_numpy(batch.token_ids).to(self.device, torch.int64)
        layout = PackedLayout.from_lengths(torch.from_numpy(batch.lengths), self.device,
                                           padded=self.padded)
        return self.model(ids, layout, self.layers, self.attention)

    def _finite(self, pooled: dict[OutputSpec, torch.Tensor], index: PoolingIndex) -> np.ndarray:
        n = index.first_rows.size
        ok = torch.ones(n, dtype=torch.bool, device=self.device)
        for output, tensor in pooled.items():
            row_ok = torch.isfinite(tensor).all(dim=1)
            if output.pool == "per-token":
                seq = torch.repeat_interleave(torch.arange(n, device=self.device),
                                              torch.from_numpy(index.body_lengths).to(self.device))
                bad = torch.zeros(n, dtype=torch.int32, device=self.device)
                row_ok = bad.index_add_(0, seq, (~row_ok).to(torch.int32)) == 0
            ok &= row_ok
        return ok.cpu().numpy()

    @staticmethod
    def _split(output: OutputSpec, array: np.ndarray, index: PoolingIndex) -> list[np.ndarray]:
        if output.pool != "per-token":
            return list(array)
        return np.split(array, np.cumsum(index.body_lengths)[:-1])
