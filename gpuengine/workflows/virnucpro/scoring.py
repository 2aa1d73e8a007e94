"""The score stage's work on one block of reads, in this process or in worker processes.

:class:`BlockScorer` turns a block of reads (ids, sequences) into its scored frames: the kept
frames (:func:`~gpuengine.workflows.virnucpro.frames.frames_for_batch`), their features
``[DNABERT-S | ESM-2]`` joined **by frame id** from the store (one ``get_many`` per slice and
table, into one reused float32 buffer; a missing side is an error naming the frame), the MLP in
slices of :data:`SCORE_BLOCK` frames, and the rows of ``prediction_results.txt`` as text
(:func:`~gpuengine.workflows.virnucpro.outputs.format_prediction_rows`).

:class:`ScorePool` runs a :class:`BlockScorer` in each of several worker processes (``spawn``;
each opens the store read-only and loads the classifier itself) and hands the results back **in
block order**, at most two blocks per worker in flight (memory stays bounded by blocks, not by
the input). Each block is scored exactly as in this process (same frames, same slices, same
fp32 MLP), so the outputs are byte for byte the same; what runs in parallel is the per-frame
host work (frame regeneration, the store's lookups, the MLP, formatting), which on one core was
most of the stage. Results travel back pickled between this process and its own children (no
untrusted data). The pool's processes are joined on every path (:meth:`ScorePool.close`).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import types
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from gpuengine.errors import GpuEngineError, ModelLoadError
from gpuengine.workflows.virnucpro.frames import frames_for_batch

SCORE_BLOCK = 32_768
"""Frames per MLP call (and per ``get_many``)."""
MAX_SCORE_WORKERS = 8


@dataclass
class ScoredBlock:
    """One block of reads, scored."""

    read_ids: list[str]
    chunks_per_read: np.ndarray
    frame_ids: list[str]
    scores: np.ndarray
    """(frames, 2) float32: [score1, score2]."""
    rows: str
    """This block's lines of ``prediction_results.txt``."""


class BlockScorer:
    """Scores blocks of reads from the features in ``store_path`` (tables ``dnabert`` and
    ``esm``) with the classifier in ``classifier_path``; close it (or use it as a context)."""

    def __init__(self, store_path: Path, classifier_path: Path, length: int):
        from gpuengine.store.reader import EmbeddingStore
        from gpuengine.workflows.virnucpro.classifier import load_classifier

        self.length = length
        self.dna = EmbeddingStore(store_path, table="dnabert")
        try:
            self.esm = EmbeddingStore(store_path, table="esm")
        except BaseException:
            self.dna.close()
            raise
        self.feature_size = self.dna.spec.dim + self.esm.spec.dim
        try:
            self.classifier = load_classifier(classifier_path, feature_size=self.feature_size)
        except BaseException:
            self.close()
            raise
        self._buffer = np.empty((0, self.feature_size), np.float32)

    def score_block(self, ids: list[str], seqs: list[str], frames=None) -> ScoredBlock:
        """``frames``: the block's frames when the caller made them already."""
        from gpuengine.workflows.virnucpro.outputs import format_prediction_rows

        if frames is None:
            frames = frames_for_batch(ids, seqs, self.length)
        scores, rows = [], []
        for start in range(0, len(frames), SCORE_BLOCK):
            frame_ids = frames.frame_ids[start:start + SCORE_BLOCK]
            result = self.score_frames(frame_ids)
            rows.append(format_prediction_rows(frame_ids, result.scores, result.virus))
            scores.append(result.scores)
        return ScoredBlock(ids, frames.chunks_per_read, frames.frame_ids,
                           np.concatenate(scores) if scores else np.zeros((0, 2), np.float32),
                           "".join(rows))

    def score_frames(self, frame_ids: list[str]):
        """The classifier's :class:`~gpuengine.workflows.virnucpro.classifier.Scores` of up to
        :data:`SCORE_BLOCK` frames."""
        if len(self._buffer) < len(frame_ids):
            self._buffer = np.empty((SCORE_BLOCK, self.feature_size), np.float32)
        features = self._buffer[:len(frame_ids)]
        dim = self.dna.spec.dim
        features[:, :dim] = _features(self.dna, frame_ids, "DNABERT-S")
        features[:, dim:] = _features(self.esm, frame_ids, "ESM-2")
        return self.classifier.score(features)

    def close(self) -> None:
        for store in (getattr(self, "esm", None), self.dna):
            if store is not None:
                store.close()

    def __enter__(self) -> BlockScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _features(store, frame_ids: list[str], what: str) -> np.ndarray:
    try:
        return store.get_many(frame_ids)  # cast to float32 where the caller puts it
    except KeyError:  # name the frame (the store's message names it inside a sentence)
        absent = next((frame_id for frame_id in frame_ids if frame_id not in store), "?")
        raise ModelLoadError(f"frame {absent!r} has no {what} embedding in the store; "
                             "features are joined by frame id and a missing side is an "
                             "error (rerun predict without --score-only to compute it)") from None


def score_workers(requested: int | None, blocks_hint: int) -> int:
    """Worker processes for the score stage: ``requested`` when given (0: score in this
    process), else one per two cores (at most :data:`MAX_SCORE_WORKERS`), none for an input
    of one block or a machine of fewer than 4 cores (where the workers only share the cores
    this process would use: on a 2-core VM two workers took twice as long each)."""
    if requested is not None:
        return max(0, requested)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    if blocks_hint < 2 or cores < 4:
        return 0
    return min(MAX_SCORE_WORKERS, blocks_hint, cores // 2)


# ----------------------------------------------------------------------------- worker side

_scorer: BlockScorer | None = None


def _init_worker(store_path: str, classifier_path: str, length: int, threads: int) -> None:
    import logging
    import signal

    import torch

    global _scorer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    logging.getLogger("gpuengine.workflows.virnucpro.classifier").setLevel(logging.ERROR)
    torch.set_num_threads(threads)
    _scorer = BlockScorer(Path(store_path), Path(classifier_path), length)


def _ready() -> bool:
    return _scorer is not None


@contextmanager
def _main_module_hidden():
    """While worker processes start: ``spawn`` would import the caller's main script in each
    child (and run it whole when it has no ``if __name__ == "__main__"`` guard); with a bare
    ``__main__`` in its place the children import only this package."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def _score_in_worker(ids: list[str], seqs: list[str]) -> ScoredBlock:
    assert _scorer is not None
    return _scorer.score_block(ids, seqs)


class ScorePool:
    """``workers`` processes scoring blocks of reads; :meth:`map` gives their
    :class:`ScoredBlock` in input order. A worker that dies (a signal, out of memory) is a
    :class:`~gpuengine.errors.GpuEngineError`, never a hang."""

    def __init__(self, workers: int, store_path: Path, classifier_path: Path, length: int):
        from concurrent.futures import ProcessPoolExecutor

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        threads = max(1, (cores or os.cpu_count() or 1) // workers)
        self.workers = workers
        self._executor = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
            initargs=(str(store_path), str(classifier_path), length, threads))
        self._pending: deque = deque()
        with _main_module_hidden():  # every worker starts now, none imports the caller's script
            started = [self._executor.submit(_ready) for _ in range(workers)]
        self._started = started

    def map(self, blocks: Iterable[tuple[Sequence[str], Sequence[str]]]) -> Iterator[ScoredBlock]:
        pending = self._pending
        for ids, seqs in blocks:
            pending.append(self._executor.submit(_score_in_worker, list(ids), list(seqs)))
            if len(pending) >= 2 * self.workers:
                yield self._result(pending.popleft())
        while pending:
            yield self._result(pending.popleft())

    @staticmethod
    def _result(future) -> ScoredBlock:
        from concurrent.futures.process import BrokenProcessPool

        try:
            return future.result()
        except BrokenProcessPool:
            raise GpuEngineError("a scoring worker process died (killed by a signal, or out of "
                                 "memory); no outputs are complete: rerun with --score-only "
                                 "to write them from the store") from None

    def close(self) -> None:
        """Cancel what has not started and join every worker (on every path)."""
        for future in [*self._started, *self._pending]:
            future.cancel()
        self._pending.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ScorePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
