"""What a reduced precision costs on a run's own weights and input, measured before the run.

A lossy precision (``--precision fp8``) changes embeddings by an amount that depends on the
weights (trained models have outlier channels that random ones lack) and on the input. So an
FP8 run first embeds a sample of its own sequences at the reference precision (fp16, exact to
rounding) and at FP8 with the same outputs, compares them by cosine, records the result in the
run record and the summary, and refuses to continue below ``--fp8-min-cosine``
(:class:`FidelityError`, exit code 4) before anything is written.

The pieces are plain functions over runners and *runner factories* (``make_runner(precision)
→ runner``) and :class:`~gpuengine.packing.WorkItem` lists, so ``gpuengine check``
(:mod:`gpuengine.check`) and ``tools/bench_fp8.py`` use the same code. The engine calls
:func:`guard_run` once the replicas are built and before any worker starts or any record is
written (:func:`gpuengine.replicas.guard_fidelity`): the FP8 side is the run's own replica on
its first device (the very kernels and quantized weights the run uses), the fp16 side a
reference runner built for the measurement and dropped after it.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from gpuengine.errors import FidelityError
from gpuengine.packing import WorkItem
from gpuengine.vocabulary import FP8_MIN_COSINE, GUARDED_PRECISIONS

log = logging.getLogger(__name__)

GUARD_REFERENCE = "fp16"
GUARD_SAMPLE = 256
DEFAULT_MIN_COSINE = FP8_MIN_COSINE
GUARD_BUDGET = 16384
"""Tokens per batch while measuring (the sample is small; memory stays modest)."""


@dataclass
class FidelityReport:
    """Cosine of ``precision`` against ``reference`` over a sample of one run's sequences."""

    precision: str
    reference: str
    sequences: int
    min_cosine: float
    mean_cosine: float
    threshold: float
    device: str = ""
    seconds: float = 0.0
    worst_index: int = -1
    """Position in the sample of the sequence with the lowest cosine."""
    per_output: dict[str, float] = field(default_factory=dict)
    """Output label → its min cosine (per-token outputs: over every token row)."""

    @property
    def passed(self) -> bool:
        return self.min_cosine >= self.threshold

    def to_json(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        return data

    def describe(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"{self.precision} against {self.reference} on {self.sequences} sequences of this "
                f"input: min cosine {self.min_cosine:.5f}, mean {self.mean_cosine:.5f} "
                f"(threshold {self.threshold}: {verdict})")


# -- sampling and embedding --------------------------------------------------------------------

def sample_indices(count: int, n: int) -> list[int]:
    """``min(n, count)`` distinct indices spread evenly over ``range(count)`` (first and last
    included): deterministic, and covering the whole input rather than its head."""
    if count <= 0 or n <= 0:
        return []
    if n >= count:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, n).round().astype(int).tolist()))


def sample_evenly(records: Iterable, count: int, n: int) -> list:
    """The records at :func:`sample_indices` of an iterable of ``count`` records (one pass)."""
    wanted = sample_indices(count, n)
    picked, want = [], iter(wanted)
    target = next(want, None)
    for index, record in enumerate(records):
        if target is None:
            break
        if index == target:
            picked.append(record)
            target = next(want, None)
    return picked


def batches(items: Sequence[WorkItem], budget: int) -> list[list[WorkItem]]:
    """Consecutive items in batches of at most ``budget`` tokens (an item larger than the
    budget alone)."""
    out: list[list[WorkItem]] = []
    current: list[WorkItem] = []
    tokens = 0
    for item in items:
        if current and tokens + item.n_tokens > budget:
            out.append(current)
            current, tokens = [], 0
        current.append(item)
        tokens += item.n_tokens
    if current:
        out.append(current)
    return out


@dataclass
class Embedded:
    """One runner's vectors for a sample: per output, one array per item."""

    vectors: dict
    finite: np.ndarray
    tokens: int
    seconds: float
    """Wall time of the timed pass (after one warm-up batch), device work included."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def embed_items(runner, items: Sequence[WorkItem], budget: int = GUARD_BUDGET, *,
                warm_up: bool = True) -> Embedded:
    """Every item through ``runner`` in order (batches of ``budget`` tokens); with ``warm_up``
    the first batch runs once untimed (kernels compile and tune), so the time is steady state."""
    groups = batches(items, budget)
    if warm_up and groups:
        runner.embed(groups[0])
    vectors: dict = {o: [] for o in runner.outputs}
    finite = []
    started = time.perf_counter()
    for group in groups:
        result = runner.embed(group)
        for output in runner.outputs:
            vectors[output].extend(result.vectors[output])
        finite.append(result.finite)
    seconds = time.perf_counter() - started
    return Embedded(vectors, np.concatenate(finite) if finite else np.zeros(0, bool),
                    sum(i.n_tokens for i in items), seconds)


def item_cosines(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """Per item: the cosine of two pooled vectors, or for per-token arrays (L, d) the lowest
    cosine over the item's token rows."""
    out = np.empty(len(a), dtype=np.float64)
    for i, (x, y) in enumerate(zip(a, b)):
        x = np.atleast_2d(np.asarray(x, np.float64))
        y = np.atleast_2d(np.asarray(y, np.float64))
        norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        cos = np.where(norms > 0, (x * y).sum(1) / np.where(norms > 0, norms, 1), 1.0)
        out[i] = cos.min() if cos.size else 1.0
    return out


def compare(test: Embedded, reference: Embedded) -> tuple[np.ndarray, dict[str, float]]:
    """Per-item cosine (lowest over outputs; a non-finite item counts 0) and each output's
    minimum."""
    per_output = {}
    worst = None
    for output in reference.vectors:
        cos = item_cosines(test.vectors[output], reference.vectors[output])
        cos = np.where(np.isfinite(cos), cos, 0.0)
        per_output[getattr(output, "label", str(output))] = float(cos.min()) if cos.size else 1.0
        worst = cos if worst is None else np.minimum(worst, cos)
    worst = np.zeros(0) if worst is None else worst
    worst = np.where(test.finite & reference.finite, worst, 0.0) if worst.size else worst
    return worst, per_output


# -- the guard ----------------------------------------------------------------------------------

def measure(make_runner: Callable[[str], object], items: Sequence[WorkItem], *,
            precision: str = "fp8", reference: str = GUARD_REFERENCE,
            threshold: float = DEFAULT_MIN_COSINE, budget: int = GUARD_BUDGET,
            runner: object | None = None) -> FidelityReport:
    """Embed ``items`` with a ``reference`` runner, then a ``precision`` runner, and compare.
    Runners made by ``make_runner`` are built one at a time and dropped after their pass;
    ``runner``, when given, is the ``precision`` side (a run's own replica, kept)."""
    started = time.perf_counter()
    results = {}
    device = ""
    for name in (reference, precision):
        built = runner is None or name != precision
        current = make_runner(name) if built else runner
        device = str(getattr(current, "device", ""))
        results[name] = embed_items(current, items, budget, warm_up=False)
        del current
        if built:
            _release_device_memory()
    cos, per_output = compare(results[precision], results[reference])
    return FidelityReport(
        precision=precision, reference=reference, sequences=len(items),
        min_cosine=float(cos.min()) if cos.size else 1.0,
        mean_cosine=float(cos.mean()) if cos.size else 1.0, threshold=threshold, device=device,
        seconds=time.perf_counter() - started,
        worst_index=int(cos.argmin()) if cos.size else -1, per_output=per_output)


def guard_run(precision: str, runner: object, make_reference: Callable[[], object],
              records: Iterable, count: int, encode: Callable[[str], np.ndarray], *,
              threshold: float = DEFAULT_MIN_COSINE, sample: int = GUARD_SAMPLE,
              max_residues: int | None = None, progress=None) -> FidelityReport | None:
    """The engine's hook: for a guarded ``precision``, measure the run's ``runner`` against a
    fp16 runner from ``make_reference()`` on an even sample of the run's ``count`` valid
    ``records`` (tokenized by ``encode``) and raise :class:`FidelityError` below
    ``threshold``; None for any other precision (nothing is built or read)."""
    if precision not in GUARDED_PRECISIONS:
        return None
    from gpuengine.store.codec import sequence_digest

    picked = sample_evenly(records, count, sample)
    items = []
    for record in picked:
        seq = record.sequence[:max_residues] if max_residues else record.sequence
        items.append(WorkItem(sequence_digest(seq), encode(seq), len(seq)))
    if progress is not None:
        progress.stage(f"fidelity guard: {len(items)} sequences at {GUARD_REFERENCE} and "
                       f"{precision}")
    report = measure(lambda _: make_reference(), items, precision=precision,
                     threshold=threshold, runner=runner)
    log.info("fidelity guard: %s", report.describe())
    if not report.passed:
        worst = picked[report.worst_index] if 0 <= report.worst_index < len(picked) else None
        raise FidelityError(
            f"--precision {precision} changes this run's embeddings too much: "
            f"{report.describe()}"
            + (f"; lowest for record {worst.id!r}" if worst is not None else "")
            + f". Nothing was written. Run --precision {GUARD_REFERENCE} (exact to rounding), "
            f"or accept the loss with a lower --fp8-min-cosine (see `gpuengine check`)")
    return report


def _release_device_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
