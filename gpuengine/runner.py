"""One model replica on one device: stage → launch → finish.

The runner knows nothing about scheduling or stores. A batch goes through three calls, which
the device worker's one thread interleaves over the batches in flight (it stages and launches
batch k + 1 before it finishes batch k) so that host work overlaps the GPU:

1. :meth:`Runner.stage` packs the items' token ids into a pinned host buffer
   (PyTorch's caching host allocator reuses the blocks) and copies ids and lengths to the
   device on the *copy stream*, recording an event.
2. :meth:`Runner.launch` makes the *compute stream* wait for that event, runs
   the forward, pools in fp32, checks finiteness, and starts asynchronous copies of the pooled
   vectors into pinned host memory, bracketed by timing events. It returns at once.
3. :meth:`Runner.finish` waits for that batch's event only — never a device-wide
   sync — and copies the vectors out per item.

On the CPU the same calls run synchronously. :meth:`Runner.embed` chains all three.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from gpuengine.models.attention import PackedLayout, select_attention
from gpuengine.packing import TOKEN_DTYPE, ItemBlock, WorkItem
from gpuengine.pooling import PoolingIndex, PoolingRule, pool
from gpuengine.store.schema import OutputSpec
from gpuengine.vocabulary import PRECISION_DTYPES

DTYPES = {precision: getattr(torch, name) for precision, name in PRECISION_DTYPES.items()}
"""The torch dtype of each of :data:`~gpuengine.vocabulary.PRECISIONS`."""

HAND_OVER_DTYPES = {"float16": torch.float16}
"""Store dtypes a runner may hand its vectors over in (:attr:`Runner.hand_over_dtype`)."""


@dataclass
class EmbeddedBatch:
    """Host results of one batch, in the order of its items."""

    vectors: dict[OutputSpec, np.ndarray | list[np.ndarray]]
    """Per output, in fp32: pooled, one (items, d) array (a row per item); per-token, one
    (L, d) array per item."""
    finite: np.ndarray
    """bool (N,): every value of the item's outputs is finite."""
    n_tokens: int
    seconds: float
    """Device busy time (CUDA events) or the compute's wall time on the CPU."""


@dataclass
class Staged:
    """A batch's inputs on the device (or on their way there)."""

    items: Sequence[WorkItem]
    ids: torch.Tensor
    lengths: torch.Tensor
    lengths_host: np.ndarray
    total: int
    max_len: int
    ready: torch.cuda.Event | None


@dataclass
class Launched:
    """A batch whose results are being copied to pinned host memory."""

    staged: Staged
    host: dict[OutputSpec, torch.Tensor]
    finite: torch.Tensor
    body_lengths: np.ndarray
    done: torch.cuda.Event | None
    start: torch.cuda.Event | None
    cpu_seconds: float = 0.0
    """On the CPU: wall time of the forward, pooling and checks in :meth:`Runner.launch`
    (not of the time until :meth:`Runner.finish`, which with batches in flight covers the
    next batch's compute too and would count it twice)."""


def place_on(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device``. On the CPU its weights are first copied, once per model, into
    memory of their own: a checkpoint read with ``torch.load(mmap=True)`` leaves weights of the
    run's dtype as views of the file's pages (``.to(dtype)`` and ``.to("cpu")`` copy nothing), so
    the forward would read the file itself — a file rewritten in place while the run lasts would
    change the weights under it, and the first forward pages them in from disk mid-kernel. (A GPU
    replica gets its copy by the move.)"""
    if device.type != "cpu":
        return model.to(device)
    if not getattr(model, "_weights_copied", False):
        with torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                tensor.data = tensor.data.clone()
        model._weights_copied = True
    return model


class Runner:
    """Holds one replica. ``stage`` and ``launch`` must each be called from one thread.

    The model may be shared with the device's other replicas (``--replicas-per-gpu``): the
    forward only reads it. At ``fp8`` the first runner of a model quantizes its weights
    (:func:`~gpuengine.models.fp8.enable_fp8`); a later runner of the same model runs that
    quantized copy (:func:`~gpuengine.models.fp8.shared_fp8`) and quantizes nothing."""

    hand_over_dtype: str | None = None
    """The store dtype pooled vectors are handed over in: None keeps them fp32 (tests,
    ``check``, the fidelity guard); a run into a float16 table sets "float16"
    (:func:`~gpuengine.engine.hand_over_in_store_dtype`), so the cast the store writer would
    make (round to nearest even: the same bits) runs on the device and half the bytes cross
    the bus, the engine's part split and the pipes to the store writers."""

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str,
                 outputs: Sequence[OutputSpec], rule: PoolingRule, *, compile: bool = False,
                 copy_stream: bool = True, kernels: str | None = None, fp8=None,
                 fp8_on_cpu: bool = False):
        self.device = device
        self.precision = precision
        self.dtype = DTYPES[precision]
        self.model = place_on(model, device)
        self.outputs = tuple(outputs)
        self.layers = sorted({o.layer for o in self.outputs})
        self.rule = rule
        # a model family with its own attention (DNABERT-S: ALiBi) chooses it; ESM-2 uses ours
        self.attention = getattr(self.model, "select_attention", select_attention)(device, self.dtype)
        self.padded = self.attention.needs_padding
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compute_stream = torch.cuda.Stream(device)
            self.copy_stream = torch.cuda.Stream(device) if copy_stream else self.compute_stream
        # per-layer kernels: the model's fastest kind on a GPU when compiling (or ``kernels``)
        self.kernels = "eager"
        if precision == "fp8":  # weights quantized once per model; fused kernels when compiling
            from gpuengine.models.fp8 import DEFAULT_FP8, enable_fp8, shared_fp8

            if getattr(self.model, "fp8", None) is not None:  # a device's later replica
                self.kernels = shared_fp8(self.model, fp8 or DEFAULT_FP8)
            else:
                fused = compile and not self.attention.prescale_q  # Triton: kernels scaling q
                self.kernels = enable_fp8(self.model, device, fp8 or DEFAULT_FP8, fused=fused,
                                          allow_cpu=fp8_on_cpu)
        elif compile and self.cuda and hasattr(self.model, "set_kernels"):
            self.kernels = kernels or self.model.fastest_kernels(device, self.attention)
            self.model.set_kernels(self.kernels)

    # -- the three steps ------------------------------------------------------------------------
    def stage(self, items: ItemBlock | Sequence[WorkItem]) -> Staged:
        block = ItemBlock.of(items)
        lengths = np.asarray(block.n_tokens, dtype=np.int64)
        total = int(lengths.sum())
        ids = torch.empty(total, dtype=torch.int32, pin_memory=self.cuda)
        ids.numpy()[:] = np.frombuffer(b"".join(block.token_bytes), TOKEN_DTYPE)
        lens = torch.from_numpy(lengths)
        if not self.cuda:
            return Staged(items, ids, lens, lengths, total, int(lengths.max()), None)
        with torch.cuda.stream(self.copy_stream):
            ids_dev = ids.to(self.device, non_blocking=True)
            lens_dev = lens.pin_memory().to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return Staged(items, ids_dev, lens_dev, lengths, total, int(lengths.max()), ready)

    @torch.inference_mode()
    def launch(self, staged: Staged) -> Launched:
        if not self.cuda:
            return self._compute(staged, None)
        # the device too, not only its stream: Triton kernels launch on the current device
        with torch.cuda.device(self.device), torch.cuda.stream(self.compute_stream):
            self.compute_stream.wait_event(staged.ready)
            # inputs were allocated on the copy stream: keep them until this stream is done
            staged.ids.record_stream(self.compute_stream)
            staged.lengths.record_stream(self.compute_stream)
            start = torch.cuda.Event(enable_timing=True)
            start.record(self.compute_stream)
            return self._compute(staged, start)

    def _compute(self, staged: Staged, start: torch.cuda.Event | None) -> Launched:
        began = time.perf_counter()
        layout = PackedLayout.build(staged.lengths, staged.total, staged.max_len, padded=self.padded)
        hidden = self.model(staged.ids, layout, self.layers, self.attention)
        index = PoolingIndex.build(staged.lengths, layout.starts, staged.total, self.rule,
                                   staged.max_len)
        pooled = {o: pool(hidden[o.layer], index, o.pool) for o in self.outputs}
        del hidden
        finite = self._finite(pooled, index, len(staged.items))  # of the fp32 vectors
        if self.hand_over_dtype is not None:
            cast = HAND_OVER_DTYPES[self.hand_over_dtype]
            pooled = {o: t.to(cast) for o, t in pooled.items()}
        body = staged.lengths_host - (self.rule.lead + self.rule.trail)
        if not self.cuda:
            return Launched(staged, pooled, finite, body, None, None,
                            time.perf_counter() - began)
        host = {o: t.to("cpu", non_blocking=True) for o, t in pooled.items()}
        finite_host = finite.to("cpu", non_blocking=True)
        done = torch.cuda.Event(enable_timing=True)
        done.record(self.compute_stream)
        return Launched(staged, host, finite_host, body, done, start)

    def finish(self, launched: Launched) -> EmbeddedBatch:
        if launched.done is not None:
            launched.done.synchronize()  # this batch only
            seconds = launched.start.elapsed_time(launched.done) / 1000.0
        else:
            seconds = launched.cpu_seconds
        vectors = {}
        for output, tensor in launched.host.items():
            array = tensor.numpy()
            if output.pool == "per-token":
                vectors[output] = [a.copy() for a in np.split(array, np.cumsum(launched.body_lengths)[:-1])]
            else:  # one (items, dim) array: the committer encodes it in one call
                vectors[output] = array.copy()
        return EmbeddedBatch(vectors, launched.finite.numpy().copy(), launched.staged.total, seconds)

    def embed(self, items: Sequence[WorkItem]) -> EmbeddedBatch:
        """All three steps, synchronously (tests, benchmarks, the CPU)."""
        return self.finish(self.launch(self.stage(items)))

    # -- helpers --------------------------------------------------------------------------------
    def _finite(self, pooled: dict[OutputSpec, torch.Tensor], index: PoolingIndex, n: int) -> torch.Tensor:
        ok = torch.ones(n, dtype=torch.bool, device=self.device)
        for output, tensor in pooled.items():
            row_ok = torch.isfinite(tensor).all(dim=1)
            if output.pool == "per-token":
                seq = torch.repeat_interleave(torch.arange(n, device=self.device), index.body_lengths,
                                              output_size=tensor.shape[0])
                bad = torch.zeros(n, dtype=torch.int32, device=self.device)
                row_ok = bad.index_add_(0, seq, (~row_ok).to(torch.int32)) == 0
            ok &= row_ok
        return ok

    def release_cached_memory(self) -> None:
        """After an out-of-memory error (only then): give cached blocks back to the driver."""
        if self.cuda:
            torch.cuda.empty_cache()

    def synthetic_items(self, tokens: int, length: int = 256) -> list[WorkItem]:
        """Random-residue items totalling about ``tokens`` tokens (warm-up, calibration)."""
        rng = np.random.default_rng(0)
        count = max(1, tokens // length)
        ids = [np.concatenate(([0], rng.integers(4, 24, length - 2), [2])).astype(np.int32)
               for _ in range(count)]
        return [WorkItem(bytes(16), i, length - 2) for i in ids]

    def calibrate(self, tokens: int) -> int:
        """Run a batch of ``tokens`` tokens twice (the first compiles and tunes kernels); returns
        the second's peak activation bytes per token (GPU) or 0."""
        if not self.cuda:
            self.embed(self.synthetic_items(min(tokens, 512)))
            return 0
        items = self.synthetic_items(tokens)
        self.embed(items)  # kernels compile and tune now; their trial buffers are not activations
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.embed(items)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        return max(1, peak // sum(i.n_tokens for i in items))
