"""``gpuengine predict``: the VirNucPro prediction, streaming, resumable, joined by frame id.

Stages (each timed in :class:`PredictSummary`):

1. **validate** the reads FASTA (DNA letters incl. IUPAC; ids as Biopython reads them; one id
   with two sequences is an error). Empty records, which crash the original, are skipped and
   reported.
2. **frames**: chunk to the expected length and translate in six frames
   (:mod:`~gpuengine.workflows.virnucpro.frames`), streamed in blocks of reads and regenerated
   when needed rather than written to split files; this pass counts them. The reads are read
   as the input processes read them (record-aligned blocks, :mod:`gpuengine.blocks`).
3. **dnabert**: DNABERT-S mean (CLS/SEP included) of every kept frame's nucleotide slice, and
4. **esm**: ESM-2 mean over residues of every kept frame's protein, both through the embedding
   engine on every GPU, committed into one LMDB store (tables ``dnabert`` and ``esm``; keyed by
   frame id, deduplicated by sequence) — so a rerun (after kill -9, or with another classifier)
   recomputes nothing that is stored. For a large input (at least 20 000 frames) the frames
   are made, hashed and tokenized in the engine's input processes, from the reads they parse
   (:class:`~gpuengine.inputs.Derivation` naming :func:`~gpuengine.workflows.virnucpro.frames.frame_records`),
   not in this process, where that work held the GIL against the device threads; the
   frames and their order are the same either way.
5. **score** (:mod:`~gpuengine.workflows.virnucpro.scoring`; blocks of reads scored in worker
   processes on a machine of 4 or more cores, the same bytes): features ``[DNABERT | ESM]``
   joined **by frame id** (read in bulk, one ``get_many`` per block and table, into one reused
   float32 buffer) (a missing side is an error that names the frame, never a silent shift),
   the MLP, and the outputs: ``prediction_results.txt``,
   ``prediction_results_highestscore.csv`` (tab-separated, per chunk), and the new per-read
   summary ``prediction_results_reads.tsv``.

Both models are read ahead (:mod:`gpuengine.preload`, a thread each, started after the
frames stage): the 3B ESM-2 checkpoint is read, hashed and built on the host while the
DNABERT-S stage runs. ``stage_seconds`` stay each stage's own wall time (they do not overlap
each other, and their sum is the wall time); the preloads' own seconds, which overlap, are in
``preload_seconds``, and what a stage waited for its preload in ``preload_wait_seconds``.

Memory is bounded by the block of reads and the per-chunk consensus table, not by the input.

``--shard I/N`` keeps the reads of one shard (by the read's sequence digest,
:mod:`gpuengine.shards`: all chunks and frames of a read in one shard) from stage 2 on; the
input is still validated whole. ``--score-only`` skips stages 3 and 4: the features must all
be in the store already (the merge step of a cluster run writes the outputs of the whole input
from the merged shards this way, in the same order as one run).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from gpuengine.config import EmbedConfig, check_replicas_per_gpu, environment
from gpuengine.errors import GpuEngineError, InputError, StoreMismatchError, UsageError
from gpuengine.fasta import ValidationReport, validate
from gpuengine.progress import NullProgress, ProgressSink
from gpuengine.records import FastaRecord
from gpuengine.replicas import ReplicaPool
from gpuengine.shards import Shard
from gpuengine.vocabulary import FP8_MIN_COSINE, PRECISIONS
from gpuengine.workflows.virnucpro.frames import Frames, chunk_sequence, frames_for_batch

log = logging.getLogger(__name__)

READ_BLOCK = 20_000
EXPECTED_LENGTHS = (300, 500)


@dataclass(frozen=True)
class PredictConfig:
    reads: Path
    length: int
    classifier: Path
    esm_model: str = "esm2_t36_3B_UR50D"
    esm_layer: int = -1
    """-1: the last layer (36 for the 3B model, VirNucPro's feature)."""
    dnabert_model: str = "zhihan1996/DNABERT-S"
    out: Path | None = None
    """Output folder; default ``<input base>_merged/`` next to the input."""
    store: Path | None = None
    """Embedding store; default ``<out>/embeddings.lmdb``."""
    precision: str | None = None
    """``fp8``: the ESM-2 stage in FP8 (guarded), DNABERT-S at its GPU default (fp16)."""
    fp8_min_cosine: float = FP8_MIN_COSINE
    """The ESM-2 stage's fidelity guard threshold with ``precision="fp8"``."""
    devices: str = "auto"
    max_tokens: int | None = None
    replicas_per_gpu: int = 1
    """Replicas of each model per device (``--replicas-per-gpu``)."""
    keep_intermediate: bool = False
    skip_invalid: bool = False
    allow_download: bool = True
    shard: Shard | None = None
    """``--shard I/N``: only the reads of this shard."""
    score_only: bool = False
    """Load no embedding model: score from the features already in the store."""
    score_workers: int | None = None
    """Processes scoring blocks of reads (0: in this process; None: one per two cores for an
    input of several blocks, see :func:`~gpuengine.workflows.virnucpro.scoring.score_workers`)."""

    def __post_init__(self) -> None:
        if self.length < 3:
            raise InputError(f"--length {self.length}: chunks must be at least 3 bp")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r} is not one of "
                             f"{', '.join(PRECISIONS)}")
        if not -1.0 <= self.fp8_min_cosine <= 1.0:
            raise UsageError(f"--fp8-min-cosine {self.fp8_min_cosine}: a cosine lies in [-1, 1]")
        check_replicas_per_gpu(self.replicas_per_gpu)

    @property
    def out_dir(self) -> Path:
        return self.out or self.reads.parent / f"{input_base(self.reads)}_merged"

    @property
    def store_path(self) -> Path:
        return self.store or self.out_dir / "embeddings.lmdb"


def input_base(path: Path) -> str:
    """``reads.fasta.gz`` → ``reads`` (known FASTA/gzip suffixes only; the original's cut at the
    first ``.fa`` anywhere in the path is not copied)."""
    name = path.name
    for suffix in (".gz", ".bgz", ".fasta", ".fas", ".fna", ".fa", ".ffn", ".fastq", ".fq"):
        name = name.removesuffix(suffix)
    return name or path.name


@dataclass
class PredictSummary:
    reads: int = 0
    """Reads read (a sharded run: the valid reads of its shard)."""
    empty_reads: int = 0
    shard: str = ""
    """``I/N`` of a sharded run, else empty."""
    valid_reads: int = 0
    """Valid reads of the whole input."""
    chunks: int = 0
    frames: int = 0
    virus_chunks: int = 0
    out_dir: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    embed: dict[str, dict] = field(default_factory=dict)
    score_workers: int = 0
    """Worker processes the score stage used (0: it scored in this process)."""
    preload_seconds: dict[str, float] = field(default_factory=dict)
    """How long reading each model ahead took (:mod:`gpuengine.preload`; ESM-2's runs
    alongside the earlier stages, so it is not part of ``wall_seconds``)."""
    preload_wait_seconds: dict[str, float] = field(default_factory=dict)
    """How long each embedding stage waited for its model's preload (part of the stage)."""

    @property
    def wall_seconds(self) -> float:
        return sum(self.stage_seconds.values())

    @property
    def interrupted(self) -> bool:
        return any(e.get("interrupted") for e in self.embed.values())


class _Stages:
    def __init__(self, summary: PredictSummary, progress: ProgressSink):
        self.summary, self.progress = summary, progress

    def __call__(self, name: str):
        stages = self

        class _Timer:
            def __enter__(self):
                stages.progress.stage(f"predict: {name}")
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                stages.summary.stage_seconds[name] = time.perf_counter() - self.start

        return _Timer()


def run_predict(config: PredictConfig, progress: ProgressSink | None = None,
                stop: threading.Event | None = None,
                replicas: ReplicaPool | None = None) -> PredictSummary:
    from gpuengine.dna_tokenizer import DNA_ALPHABET
    from gpuengine.engine import run_embed
    from gpuengine.workflows.virnucpro.classifier import load_classifier

    progress = progress or NullProgress()
    replicas = replicas if replicas is not None else ReplicaPool()
    summary = PredictSummary(out_dir=str(config.out_dir))
    stage = _Stages(summary, progress)
    if config.length not in EXPECTED_LENGTHS:
        log.warning("--length %d: VirNucPro's classifiers expect 300 or 500", config.length)
    if config.precision == "fp8":  # before the DNABERT-S stage, not after it
        from gpuengine.devices import parse_devices
        from gpuengine.models.fp8 import check_fp8_run

        check_fp8_run("esm2", parse_devices(config.devices))
    with stage("validate"):
        report = _validate_reads(config, DNA_ALPHABET)
    with stage("frames"):
        counts = _count_frames(config, report)
        summary.reads, summary.empty_reads = counts["reads"], counts["empty"]
        summary.chunks, summary.frames = counts["chunks"], counts["frames"]
        summary.valid_reads = report.valid
    if config.shard is not None:
        summary.shard = config.shard.label
        progress.stage(f"shard {config.shard.label}: {summary.reads:,} of {report.valid:,} "
                       "reads")
    try:
        config.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GpuEngineError(f"cannot create the output folder {config.out_dir}: "
                             f"{exc.strerror or exc}") from None
    stages = (("dnabert", config.dnabert_model, (-1,), "nucleotides"),
              ("esm", config.esm_model, (config.esm_layer,), "proteins"))
    configs = {name: _stage_config(config, name, model, layers)
               for name, model, layers, _ in stages}
    preloads = {} if config.score_only else _start_preloads(config, configs, replicas)
    try:
        for name, model, layers, column in () if config.score_only else stages:
            source = _frame_source(config, report, column, counts)
            with stage(name):
                summary.preload_wait_seconds[name] = preloads[name].wait()
                try:
                    result = run_embed(configs[name], progress, stop, records=source,
                                       replicas=replicas)
                except StoreMismatchError as exc:  # predict has no --table: say what to do
                    raise StoreMismatchError(
                        f"{str(exc).split('; to keep both')[0]}; predict keeps its features in "
                        "the tables 'dnabert' and 'esm': use another --store (or --out)") from None
            summary.embed[name] = result.to_json()
            if result.interrupted:
                return summary
            if result.failed:
                raise InputError(f"{len(result.failed)} frames could not be embedded by {model} "
                                 f"(first: {result.failed[0][0]}: {result.failed[0][1]}); no "
                                 "prediction is written with missing features")
    finally:
        for name, preload in preloads.items():
            preload.wait()
            summary.preload_seconds[name] = preload.seconds
        if preloads:
            replicas.drop_built()
    with stage("score"):
        summary.virus_chunks = _score(config, report, load_classifier, summary)
    return summary


def _stage_config(config: PredictConfig, name: str, model: str,
                  layers: tuple[int, ...]) -> EmbedConfig:
    return EmbedConfig(
        inputs=(config.reads,), model=model, out=config.store_path, layers=layers,
        pools=("mean",), precision=_stage_precision(config.precision, name),
        table=name, devices=config.devices, max_tokens=config.max_tokens,
        replicas_per_gpu=config.replicas_per_gpu, allow_download=config.allow_download,
        max_residues=None, fp8_min_cosine=config.fp8_min_cosine, shard=config.shard,
        env=environment())


def _start_preloads(config: PredictConfig, configs: dict[str, EmbedConfig],
                    replicas: ReplicaPool) -> dict:
    """Both models read ahead (:mod:`gpuengine.preload`), one thread each, started once the
    input is known good (an input error still shows at once): the DNABERT-S stage waits for
    its own; ESM-2's (the 3B checkpoint: read, hashed, built on the host; at fp8 a second
    build for the guard's fp16 reference) runs alongside the DNABERT-S stage."""
    from gpuengine.preload import ModelPreload

    preloads = {"dnabert": ModelPreload(configs["dnabert"], replicas),
                "esm": ModelPreload(configs["esm"], replicas,
                                    builds=2 if config.precision == "fp8" else 1)}
    for preload in preloads.values():
        preload.start()
    return preloads


def _stage_precision(precision: str | None, stage: str) -> str | None:
    """``--precision fp8`` runs the ESM-2 stage in FP8 (guarded, see gpuengine.fidelity); the
    DNABERT-S stage, which FP8 does not cover, keeps its GPU default (fp16)."""
    return None if precision == "fp8" and stage == "dnabert" else precision


def _validate_reads(config: PredictConfig, alphabet: frozenset[str]) -> ValidationReport:
    """Empty records are skipped and reported (the original crashes on them); any other problem
    stops the run unless ``skip_invalid``."""
    report = validate([config.reads], alphabet=alphabet, skip_invalid=True)
    empty = [p for p in report.problems if p.kind == "empty-sequence"]
    others = [p for p in report.problems if p.kind != "empty-sequence"]
    for problem in empty[:20]:
        log.warning("skipping an empty record: %s", problem.describe())
    if others and not config.skip_invalid:
        listed = "\n".join(p.describe() for p in others[:20])
        raise InputError(f"{len(others)} invalid reads in {config.reads}:\n{listed}\n"
                         "Fix them, or rerun with --skip-invalid to skip them")
    return report


def _frame_blocks(config: PredictConfig, report: ValidationReport
                  ) -> Iterator[tuple[list[str], list[str], Frames]]:
    """(read ids, read sequences, their kept frames) per block of reads (of the shard)."""
    for ids, seqs in _read_blocks(config, report):
        yield ids, seqs, frames_for_batch(ids, seqs, config.length)


def _read_blocks(config: PredictConfig, report: ValidationReport
                 ) -> Iterator[tuple[list[str], list[str]]]:
    """(read ids, read sequences) per block of at least READ_BLOCK reads (of the shard): the
    blocks every pass makes its frames from (the score stage's blocks are the same, whether
    scored here or in worker processes)."""
    ids: list[str] = []
    seqs: list[str] = []
    keep = config.shard.holds_sequence if config.shard is not None else None
    for block_ids, block_seqs in _valid_reads(config, report):
        if keep is not None:
            kept = [i for i, seq in enumerate(block_seqs) if keep(seq)]
            block_ids, block_seqs = [block_ids[i] for i in kept], [block_seqs[i] for i in kept]
        ids += block_ids
        seqs += block_seqs
        if len(ids) >= READ_BLOCK:
            yield ids, seqs
            ids, seqs = [], []
    if ids:
        yield ids, seqs


def _valid_reads(config: PredictConfig, report: ValidationReport
                 ) -> Iterator[tuple[list[str], list[str]]]:
    """The valid reads (ids, normalised sequences), a block of the file at a time, read as the
    input processes read them (:mod:`gpuengine.blocks`: a few C-level calls a block, not a
    few Python lines a record); the records validation skipped are left out."""
    from bisect import bisect_left

    from gpuengine.blocks import parse_block, read_blocks

    name = report.files[0]
    skip = sorted(index for file, index in report.skip if file == name)
    for block in read_blocks(config.reads):
        lo = bisect_left(skip, block.first_index)
        hi = bisect_left(skip, block.first_index + block.count)
        ids, seqs = parse_block(block, name, None, skip[lo:hi])
        yield ids, [seq.decode("utf-8") for seq in seqs]


def _count_frames(config: PredictConfig, report: ValidationReport) -> dict:
    """The counts of stage 2, and ``frames_per_read`` (int32, one per read of the shard, 4
    bytes a read) for finding a frame by its position (:func:`_pick_frames`)."""
    counts = {"reads": report.records, "empty": report.problem_count, "chunks": 0, "frames": 0,
              "nucleotides": 0, "proteins": 0}
    if config.shard is not None:
        counts["reads"] = 0
    per_read = []
    for ids, _, frames in _frame_blocks(config, report):
        if config.shard is not None:
            counts["reads"] += len(ids)
        counts["chunks"] += int(frames.chunks_per_read.sum())
        counts["frames"] += len(frames)
        counts["nucleotides"] += sum(map(len, frames.nucleotides))
        counts["proteins"] += sum(map(len, frames.proteins))
        per_read.append(np.bincount(frames.read_index, minlength=len(ids)).astype(np.int32))
    counts["frames_per_read"] = np.concatenate(per_read) if per_read else np.zeros(0, np.int32)
    return counts


def _frame_source(config: PredictConfig, report: ValidationReport, column: str,
                  counts: dict):
    """The frames of one embedding stage as the engine's input: derived from the reads by
    whichever reader parses them (input processes, for a large input: the frames are made,
    hashed and tokenized there, not in this process; else the planner's thread)."""
    from gpuengine.inputs import Derivation, FastaInput, RecordSource

    shard = None if config.shard is None else [config.shard.index, config.shard.count]
    derive = Derivation("gpuengine.workflows.virnucpro.frames:frame_records",
                        {"length": config.length, "column": column, "shard": shard})
    return RecordSource(lambda: _frame_records(config, report, column), counts["frames"],
                        counts[column], FastaInput((config.reads,), report, None),
                        derive=derive,
                        pick=lambda positions: _pick_frames(config, report, column,
                                                            counts["frames_per_read"],
                                                            positions))


def _pick_frames(config: PredictConfig, report: ValidationReport, column: str,
                 frames_per_read: np.ndarray, positions) -> list[FastaRecord]:
    """The records :func:`_frame_records` gives at ``positions`` (sorted), made from the reads
    that hold them only: one pass that parses the reads but translates just those (the fp8
    guard's sample of 256 frames, not all of them again)."""
    positions = np.asarray(positions, dtype=np.int64)
    if not len(positions):
        return []
    ends = np.cumsum(frames_per_read, dtype=np.int64)  # frames up to and including each read
    reads = np.searchsorted(ends, positions, side="right")
    if reads[-1] >= len(frames_per_read):
        raise IndexError(f"frame {int(positions[-1])} is past the last of {int(ends[-1])}")
    offsets = positions - (ends[reads] - frames_per_read[reads])
    wanted: dict[int, list[tuple[int, int]]] = {}
    for position, read, offset in zip(positions.tolist(), reads.tolist(), offsets.tolist()):
        wanted.setdefault(read, []).append((offset, position))
    path = str(config.reads)
    picked: list[FastaRecord] = []
    first = 0  # the shard's read index of the block's first read
    last = int(reads[-1])
    for ids, seqs in _read_blocks(config, report):
        for read in sorted(r for r in wanted if first <= r < first + len(ids)):
            frames = frames_for_batch([ids[read - first]], [seqs[read - first]], config.length)
            for offset, position in wanted[read]:
                picked.append(FastaRecord(frames.frame_ids[offset],
                                          getattr(frames, column)[offset], path, 0, position))
        first += len(ids)
        if first > last:
            break
    return picked


def _frame_records(config: PredictConfig, report: ValidationReport, column: str) -> Iterator[FastaRecord]:
    path = str(config.reads)
    index = 0
    for _, _, frames in _frame_blocks(config, report):
        for frame_id, sequence in zip(frames.frame_ids, getattr(frames, column)):
            yield FastaRecord(frame_id, sequence, path, 0, index)
            index += 1


def _score(config: PredictConfig, report: ValidationReport, load_classifier,
           summary: PredictSummary) -> int:
    """Stage 5 (:mod:`~gpuengine.workflows.virnucpro.scoring`): blocks of reads scored in
    worker processes for an input of several blocks (``config.score_workers``), else here;
    the outputs are written here, in block order, the same bytes either way."""
    from gpuengine.store.reader import EmbeddingStore
    from gpuengine.workflows.virnucpro.outputs import ConsensusCollector, PredictionWriter
    from gpuengine.workflows.virnucpro.scoring import BlockScorer, ScorePool, score_workers

    out = config.out_dir
    with EmbeddingStore(config.store_path, table="dnabert") as dna, \
            EmbeddingStore(config.store_path, table="esm") as esm:
        feature_size = dna.spec.dim + esm.spec.dim
    classifier = load_classifier(config.classifier, feature_size=feature_size)
    if classifier.expected_length and classifier.expected_length != config.length:
        log.warning("classifier %s was trained on %d-bp chunks but --length is %d: the "
                    "scores will be off (use the matching model)", config.classifier,
                    classifier.expected_length, config.length)
    del classifier  # checked and warned about here; each scorer loads its own
    workers = 0 if config.keep_intermediate else score_workers(
        config.score_workers, -(-summary.reads // READ_BLOCK))
    summary.score_workers = workers
    collector = ConsensusCollector()
    blocks = _read_blocks(config, report)
    with PredictionWriter(out / "prediction_results.txt") as writer:
        if workers:
            with ScorePool(workers, config.store_path, config.classifier, config.length) as pool:
                for scored in pool.map(blocks):
                    collector.add_reads(scored.read_ids, scored.chunks_per_read)
                    writer.write_rows(scored.rows, len(scored.frame_ids))
                    collector.add_frames(scored.frame_ids, scored.scores)
        else:
            intermediates = _Intermediates(config) if config.keep_intermediate else None
            with BlockScorer(config.store_path, config.classifier, config.length) as scorer:
                for ids, seqs in blocks:
                    frames = frames_for_batch(ids, seqs, config.length)
                    scored = scorer.score_block(ids, seqs, frames)
                    collector.add_reads(ids, scored.chunks_per_read)
                    if intermediates:
                        intermediates.write(ids, seqs, frames)
                    writer.write_rows(scored.rows, len(scored.frame_ids))
                    collector.add_frames(scored.frame_ids, scored.scores)
            if intermediates:
                intermediates.close()
    collector.write_consensus(out / "prediction_results_highestscore.csv")
    collector.write_read_summary(out / "prediction_results_reads.tsv")
    return sum(1 for _, virus in collector.chunk_calls() if virus)


class _Intermediates:
    """``--keep-intermediate``: the chunked reads and the kept frames, one unwrapped line per
    sequence (the original's ``<base>_identified_nucleotide.fa`` / ``_protein.faa``)."""

    def __init__(self, config: PredictConfig):
        base = config.out_dir / input_base(config.reads)
        self.chunks = open(f"{base}_chunked{config.length}.fa", "w")
        self.nucleotide = open(f"{base}_identified_nucleotide.fa", "w")
        self.protein = open(f"{base}_identified_protein.faa", "w")
        self.length = config.length

    def write(self, ids: list[str], seqs: list[str], frames: Frames) -> None:
        for read_id, seq in zip(ids, seqs):
            for chunk_id, chunk in chunk_sequence(read_id, seq, self.length):
                self.chunks.write(f">{chunk_id}\n{chunk}\n")
        for fid, nuc, prot in zip(frames.frame_ids, frames.nucleotides, frames.proteins):
            self.nucleotide.write(f">{fid}\n{nuc}\n")
            self.protein.write(f">{fid}\n{prot}\n")

    def close(self) -> None:
        for handle in (self.chunks, self.nucleotide, self.protein):
            handle.close()
