"""Wires everything for one ``embed`` run and owns all its threads.

    resolve model → read weights → open store table → validate input (before any replica)
    → build one replica per device → plan (thread) → schedule → device workers (one thread per
    device) → engine loop: collect → update scheduler → queue commit groups → committer (thread)

The engine loop, in numbered steps:

1. Take the next message: a batch outcome from a worker, aliases from the planner, a worker's
   exit or the planner's end.
2. ``ok``: tell the scheduler, move each finite item's ids from *pending* to *committing* and
   add an entry with its vectors to the open group; non-finite items fail loudly.
3. ``oom``: the scheduler splits and requeues; an item that cannot fit alone fails.
4. Every ``commit_every`` sequences or half a second, hand the open group to the committer.
5. Stop when the planner is done and the scheduler is drained (or on a stop request, once no
   batch is in flight); flush the last group, wait for the committer, close the run record.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from gpuengine import __version__
from gpuengine.budget import activation_bytes_per_token
from gpuengine.committer import Committer
from gpuengine.config import EmbedConfig
from gpuengine.budget import TokenBudget
from gpuengine.devices import (DeviceMemory, MemoryProbe, MemoryTelemetry, initial_budget,
                               parse_devices)
from gpuengine.errors import (EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, DeviceError,
                              StoreMismatchError, UsageError)
from gpuengine.fasta import ValidationReport, stream_valid, validate
from gpuengine.input_process import InputProcess, tokenizer_spec
from gpuengine.models.registry import Family, Weights, family
from gpuengine.models.sources import resolve, weights_checksum
from gpuengine.planner import DigestFilter, Ledger, Planner
from gpuengine.progress import DeviceProgress, NullProgress, ProgressSink, ProgressSnapshot
from gpuengine.records import FastaRecord, RecordProblem
from gpuengine.replicas import Replica, ReplicaPool
from gpuengine.runner import DTYPES, Runner
from gpuengine.scheduler import Scheduler
from gpuengine.store import codec
from gpuengine.store.schema import ModelIdentity, OutputSpec, TableSpec
from gpuengine.store.writer import CommitEntry, CommitPart, CommitRows, StoreWriter, group_counts
from gpuengine.worker import BatchOutcome, DeviceWorker, WorkerExit

log = logging.getLogger(__name__)

GROUP_SECONDS = 0.5
INPUT_PROCESS_MIN_RECORDS = 20_000
"""Smaller FASTA inputs are read in the planner thread when the config leaves it open (the
child process costs a start-up of about 0.1-0.2 s)."""


@dataclass
class RunSummary:
    """What a run did; printed by the CLI, returned to library callers."""

    store: str
    table: str
    model: str
    synthetic_weights: bool
    records_read: int = 0
    valid_records: int = 0
    invalid_skipped: int = 0
    duplicate_records: int = 0
    truncated: int = 0
    already_stored: int = 0
    deduplicated: int = 0
    embedded: int = 0
    committed_records: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    tokens: int = 0
    residues: int = 0
    wall_seconds: float = 0.0
    """Whole run: model resolution, reading, validation, loading, warm-up, embedding, commit."""
    embed_seconds: float = 0.0
    """From the first batch claimed to the last commit (the steady-state part)."""
    devices: list[dict] = field(default_factory=list)
    commit_transactions: int = 0
    commit_seconds: float = 0.0
    """Time the store writer spent encoding, writing and syncing transactions."""
    commit_wait_seconds: float = 0.0
    """Time the run waited for the store writer after handing it the last group (long when
    the store's disk, not the devices, limits the run)."""
    interrupted: bool = False
    run_id: str = ""
    """Key of the run's progress record in the store's ``runs`` database."""
    run_started: dict = field(default_factory=dict)
    """That record as this invocation found it (counts of earlier, interrupted attempts;
    ``resumes``)."""
    fidelity: dict | None = None
    """``--precision fp8``: the fidelity guard's measurement on a sample of this input
    (:class:`gpuengine.fidelity.FidelityReport`), also in the run record."""

    @property
    def tokens_per_second(self) -> float:
        """Tokens (BOS/EOS included) per second of embedding time."""
        return self.tokens / self.embed_seconds if self.embed_seconds else 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_PARTIAL if self.failed else EXIT_OK

    def to_json(self) -> dict:
        data = asdict(self)
        data["tokens_per_second"] = self.tokens_per_second
        data["exit_code"] = self.exit_code
        return data


@dataclass(frozen=True)
class RecordSource:
    """Already-valid records to embed instead of FASTA files (workflows such as ``predict``
    derive them); ``iterate`` must give the same records, in the same order, every call."""

    iterate: Callable[[], Iterable[FastaRecord]]
    count: int
    residues: int
    fasta: FastaInput | None = None
    """Set when the records are the valid ones of FASTA files: the input process can read
    them itself."""


@dataclass(frozen=True)
class FastaInput:
    paths: tuple
    report: ValidationReport
    alphabet: frozenset[str] | None


def resolve_outputs(layers: tuple[int, ...], pools: tuple[str, ...], num_layers: int) -> tuple[OutputSpec, ...]:
    """Negative layers count from the end (-1 = the last layer); 0 is the embedding layer."""
    resolved = []
    for layer in layers:
        index = layer + num_layers + 1 if layer < 0 else layer
        if not 0 <= index <= num_layers:
            raise UsageError(f"--layers {layer}: the model has layers 0..{num_layers} "
                             f"(or -{num_layers + 1}..-1)")
        resolved.append(index)
    if len(set(resolved)) != len(resolved):
        raise UsageError(f"--layers {layers} names the same layer twice")
    return tuple(OutputSpec(layer, pool) for layer in resolved for pool in pools)


def run_embed(config: EmbedConfig, progress: ProgressSink | None = None,
              stop: threading.Event | None = None, runner_factory=None,
              records: RecordSource | None = None,
              replicas: ReplicaPool | None = None,
              final_records: Callable[[RunSummary], dict[str, dict]] | None = None) -> RunSummary:
    """Embed ``config.inputs`` (or ``records``) into ``config.out``; see the module docstring.

    ``runner_factory(device, precision, outputs)`` replaces the model runner (tests simulate
    devices with it; the benchmark measures the host pipeline with a no-op runner).
    ``replicas`` keeps built replicas across runs (the daemon, ``predict``).
    ``final_records(summary)`` returns run records (e.g. a daemon's job record) committed in
    the same transaction as the run's last embeddings, when the run completes."""
    progress = progress or NullProgress()
    stop = stop or threading.Event()
    started = time.perf_counter()
    progress.stage(f"resolving model {config.model}")
    source = resolve(config.model, allow_download=config.allow_download and not config.env.offline)
    fam = family(source.family)
    max_residues = config.effective_max_residues(fam.default_max_residues)
    created = not Path(config.out).exists()
    writer = StoreWriter(config.out)
    try:
        precision = run_precision(config, fam)
        if precision == "fp8" and runner_factory is None:  # ESM-2, capable GPUs (issue 17)
            from gpuengine.models.fp8 import check_fp8_run

            check_fp8_run(fam.name, parse_devices(config.devices))
        conflict_check = _store_conflict_check(writer, config, max_residues, precision)
        if records is None:
            progress.stage("validating input")
            report = validate(list(config.inputs), alphabet=fam.alphabet,
                              skip_invalid=config.skip_invalid, extra_check=conflict_check)
            records = RecordSource(lambda: stream_valid(list(config.inputs), report,
                                                        alphabet=fam.alphabet),
                                   report.valid, report.residues,
                                   FastaInput(tuple(config.inputs), report, fam.alphabet))
            counts = dict(records_read=report.records, valid_records=report.valid,
                          invalid_skipped=len(report.skip) - report.duplicate_records,
                          duplicate_records=report.duplicate_records)
        else:
            counts = dict(records_read=records.count, valid_records=records.count)
        if stop.is_set():  # Ctrl-C while validating: nothing loaded, nothing to drain
            summary = RunSummary(str(config.out), config.table, source.name, False,
                                 interrupted=True, **counts)
            summary.wall_seconds = time.perf_counter() - started
            empty = created and writer.is_empty()
            writer.close()
            if empty:
                _remove_store(config.out)
            return summary
        progress.stage(f"reading weights {source.path}")
        weights = (fam.read(source) if replicas is None else
                   replicas.weights(_file_key(source.path), lambda: fam.read(source)))
        if weights.synthetic:
            log.warning("model %s has RANDOM weights (a gpuengine test checkpoint): the "
                        "embeddings mean nothing", source.path)
        spec = _table_spec(config, fam, weights, weights_checksum(source, config.env.cache_dir),
                           max_residues, precision)
        writer.open_table(spec)
        summary = RunSummary(str(config.out), spec.name, source.name, weights.synthetic, **counts)
        _Run(config, fam, weights, spec, writer, records, summary, progress, stop,
             runner_factory, replicas, final_records).execute()
    except BaseException:
        try:
            empty = created and writer.is_empty()
        finally:
            writer.close()
        if empty:
            _remove_store(config.out)
        raise
    writer.close()
    summary.wall_seconds = time.perf_counter() - started
    return summary


def run_precision(config: EmbedConfig, fam: Family) -> str:
    """The compute precision of a run: ``--precision``, else fp32 on the CPU and the family's
    GPU precision (fp16) on GPUs. Part of the table's identity."""
    if config.precision is not None:
        return config.precision
    return "fp32" if parse_devices(config.devices)[0].type == "cpu" else fam.gpu_precision


def _table_spec(config: EmbedConfig, fam: Family, weights: Weights, sha256: str,
                max_residues: int | None, precision: str) -> TableSpec:
    identity = ModelIdentity(family=fam.name, name=weights.source.name, sha256=sha256,
                             num_layers=weights.num_layers, embed_dim=weights.embed_dim,
                             attention_heads=weights.attention_heads,
                             vocab_size=weights.vocab_size)
    outputs = resolve_outputs(config.layers, config.pools, weights.num_layers)
    return TableSpec(name=config.table, model=identity, outputs=outputs,
                     store_dtype=config.store_dtype, dim=weights.embed_dim,
                     max_residues=max_residues, precision=precision)


def _store_conflict_check(writer: StoreWriter, config: EmbedConfig, max_residues: int | None,
                          precision: str):
    """Refuse a truncation or compute precision that differs from the table's, and return the
    check that an id already in the table with another sequence is a problem of the record
    (all before any weights are read; a table not in the store yet holds no id)."""
    table = config.table
    stored_spec = writer.stored_spec(table)
    if stored_spec is None:
        return None
    on = "CPU" if parse_devices(config.devices)[0].type == "cpu" else "GPU"
    writer.check_precision(table, precision, "" if config.precision else
                           f" (the default on the {on}, as no --precision was given)")
    if (stored_spec.max_residues or None) != (max_residues or None):
        raise StoreMismatchError(
            f"store {writer.path} table {table!r} holds sequences truncated to "
            f"{stored_spec.max_residues or 'none'} residues (max_residues); this run asks for "
            f"{max_residues or 'none'}; to keep both, add a new named table with --table NAME "
            "(or use another --out)")

    def check(record: FastaRecord) -> RecordProblem | None:
        stored = writer.record_digests(table, [record.id])[0]
        if stored is None:
            return None
        seq = record.sequence[:max_residues] if max_residues else record.sequence
        if stored == codec.sequence_digest(seq):
            return None
        return RecordProblem("store-conflict", record.path, record.line, record.id, record.index,
                             detail=f"the store {writer.path} already maps this id to a different "
                                    "sequence")
    return check


def _file_key(path: Path) -> tuple:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _remove_store(path: Path) -> None:
    """Undo the creation of a store that a failed run left without a single record."""
    for name in ("data.mdb", "lock.mdb"):
        (Path(path) / name).unlink(missing_ok=True)
    try:
        Path(path).rmdir()
    except OSError:
        pass


class _Run:
    """One run's threads and state (see the module docstring for the loop)."""

    def __init__(self, config: EmbedConfig, fam: Family, weights: Weights, spec: TableSpec,
                 writer: StoreWriter, records: RecordSource, summary: RunSummary,
                 progress: ProgressSink, stop: threading.Event, runner_factory=None,
                 replicas: ReplicaPool | None = None, final_records=None):
        self.config, self.fam, self.weights, self.spec = config, fam, weights, spec
        self.writer, self.records, self.summary = writer, records, summary
        self.progress, self.stop = progress, stop
        self.runner_factory = runner_factory
        self.replicas = replicas
        self.final_records = final_records
        self.telemetry: MemoryTelemetry | None = None
        self.inbox: queue.Queue = queue.Queue()
        self.halt = threading.Event()
        """Workers stop pulling new batches once set (on a stop request, an error, or the end)."""
        self.ledger = Ledger()
        self.scheduler = Scheduler()
        self.group: list[CommitPart] = []
        self.group_rows = 0
        """Sequences and aliases in the open group."""
        self.group_started = time.monotonic()
        self.started = time.perf_counter()
        """When embedding started: the one time base of the progress bar and the summary."""
        self.reader: InputProcess | None = None
        self.workers: list[DeviceWorker] = []
        self.committer: Committer | None = None
        self.planner_thread: threading.Thread | None = None

    def execute(self) -> None:
        self.tokenizer = self.fam.tokenizer(self.weights.source)
        try:
            self.reader = self._start_input_process()
            self._execute()
        finally:
            self._stop_threads()

    def _stop_threads(self) -> None:
        """Stop and join every thread and child process the run started, on every path.

        A thread still running when the interpreter exits is killed by it; one inside torch
        then (even freeing a tensor) aborts the whole process with "terminate called without
        an active exception" (exit 134) after the run has committed everything."""
        self.halt.set()  # workers take no new batch, the planner reads no further
        if self.reader is not None:
            self.reader.close()  # kills and reaps the child; a planner reading its pipe sees the end
        if self.committer is not None and self.committer.is_alive():
            self.committer.finish()  # a path that failed before handing over the last group
        if self.telemetry is not None:
            self.telemetry.stop()
        for thread in [self.planner_thread, *self.workers]:
            if thread is None:
                continue
            thread.join(10.0)
            while thread.is_alive():  # a device worker finishing a long batch (CPU, big model)
                log.info("waiting for %s to finish", thread.name)
                thread.join(10.0)

    def _start_input_process(self) -> InputProcess | None:
        """The child process reading the FASTA input, if this run uses one (started before
        the devices, so its start-up overlaps theirs)."""
        fasta = self.records.fasta
        choice = self.config.input_process
        if choice is None:
            choice = self.config.env.input_process
        if choice is None:
            choice = self.records.count >= INPUT_PROCESS_MIN_RECORDS
        spec = tokenizer_spec(self.tokenizer)
        if fasta is None or not choice or spec is None:
            return None
        from gpuengine.planner import LOOKUP_CHUNK  # read now: tests make chunks smaller

        skip: dict[str, list[int]] = {}
        for name, index in fasta.report.skip:
            skip.setdefault(name, []).append(index)
        return InputProcess(fasta.paths, skip, fasta.alphabet, self.spec.max_residues, spec,
                            LOOKUP_CHUNK)

    def _execute(self) -> None:
        self._fidelity_guard()
        workers = self._start_workers()
        run_id = _run_id(self.config, self.spec)
        self.summary.run_id = run_id
        info = {"command": "embed", "engine_version": __version__,
                "inputs": [str(p) for p in self.config.inputs],
                "precision": workers[0].runner.precision}
        if self.summary.fidelity is not None:
            info["fidelity"] = self.summary.fidelity
        self.summary.run_started = self.writer.begin_run(run_id, info)
        committer = self.committer = Committer(self.writer, self.spec.name, run_id, self.ledger)
        planner = self._planner()
        committer.start()
        planner_thread = threading.Thread(target=self._plan, args=(planner,), daemon=True,
                                          name="gpuengine-planner")  # joined in _stop_threads
        self.progress.start(self.records.count, self.records.residues)
        self.started = time.perf_counter()
        planner_thread.start()
        self.planner_thread = planner_thread
        completed = False
        with relaxed_collector():  # the loop allocates; see relaxed_collector
            try:
                self._loop(workers, committer, planner)
                completed = not self.summary.interrupted
            finally:
                self._commit_last(workers, committer, planner, completed)
        if committer.error is not None:
            raise committer.error
        self._summarize(workers, committer, planner, time.perf_counter() - self.started)
        status = "interrupted" if self.summary.interrupted else "complete"
        self.writer.finish_run(run_id, status, {"failed": len(self.summary.failed),
                                                "embedded": self.summary.embedded,
                                                "committed_records": self.summary.committed_records})

    def _fidelity_guard(self) -> None:
        """A lossy precision (fp8) is measured against fp16 on an even sample of this run's
        input, on its first device, before any replica is built or anything is written; below
        ``fp8_min_cosine`` the run stops (:mod:`gpuengine.fidelity`)."""
        from gpuengine.fidelity import guard_run

        device = parse_devices(self.config.devices)[0]
        report = guard_run(self.spec.precision, lambda p: self._make_runner(device, p),
                           self.records.iterate(), self.records.count, self.tokenizer.encode,
                           threshold=self.config.fp8_min_cosine,
                           max_residues=self.spec.max_residues, progress=self.progress)
        if report is not None:
            self.summary.fidelity = report.to_json()

    def _commit_last(self, workers: list[DeviceWorker], committer: Committer, planner: Planner,
                     completed: bool) -> None:
        """After the loop, on every path: halt, commit the open group, wait for the writer,
        show the final progress (everything committed) and close the display."""
        self.halt.set()
        if self.telemetry:
            self.telemetry.stop()
        try:
            extra = None
            if completed and self.final_records is not None:
                # the caller's records (a job record) go into the same transaction as the
                # run's last embeddings, with the summary those embeddings complete
                self._summarize(workers, committer, planner, time.perf_counter() - self.started,
                                group_counts(self.group))
                extra = self.final_records(self.summary)
            committer.put(self.group, extra_runs=extra)
            self.group, self.group_rows = [], 0
            waited = time.perf_counter()
            committer.finish()
            self.summary.commit_wait_seconds = time.perf_counter() - waited
            self._report_progress(workers, committer, planner)
        finally:
            self.progress.close()

    def _start_workers(self) -> list[DeviceWorker]:
        devices = parse_devices(self.config.devices)
        precision = self.spec.precision
        if devices[0].type == "cpu" and self.config.threads:
            torch.set_num_threads(self.config.threads)
        estimate = activation_bytes_per_token(self.weights.embed_dim, DTYPES[precision].itemsize,
                                              len(self.spec.outputs))
        self.workers: list[DeviceWorker] = []
        memories = []
        for index, device in enumerate(devices):
            replica = self._replica(device, precision, estimate)
            worker = DeviceWorker(index, replica.runner, replica.budget, self.scheduler,
                                  self.inbox, self.halt)
            if replica.memory is not None:
                replica.memory.stats = worker.stats
                memories.append(replica.memory)
            self.workers.append(worker)
        self.telemetry = MemoryTelemetry(memories) if memories else None
        if self.telemetry:
            self.telemetry.start()
        for worker in self.workers:
            worker.start()
        return self.workers

    def _replica(self, device: torch.device, precision: str, estimate: int) -> Replica:
        """A warmed-up replica on ``device``: from the pool when one fits, else built now."""
        key = (self.spec.model.sha256, self.spec.outputs, str(device), precision,
               self.config.max_tokens, self.runner_factory)
        replica = self.replicas.get(key) if self.replicas is not None else None
        if replica is not None:
            return replica
        self.progress.stage(f"loading {self.weights.source.name} on {device} ({precision})")
        runner = self._make_runner(device, precision)
        budget = initial_budget(device, estimate, self.config.max_tokens)
        memory = self._warm_up(runner, budget) if device.type == "cuda" else None
        replica = Replica(runner, budget, memory)
        if self.replicas is not None:
            self.replicas.put(key, replica)
        return replica

    def _make_runner(self, device: torch.device, precision: str) -> Runner:
        if self.runner_factory is not None:
            return self.runner_factory(device, precision, self.spec.outputs)
        model = self.fam.build(self.weights, DTYPES[precision])
        compile_kernels = self.config.compile if self.config.compile is not None else device.type == "cuda"
        return Runner(model, device, precision, self.spec.outputs, self.fam.pooling_rule,
                      compile=compile_kernels)

    def _warm_up(self, runner: Runner, budget: TokenBudget) -> DeviceMemory:
        """Run one batch at the full budget before any input is claimed (memory problems show
        now, kernels compile now) and calibrate bytes per token from the allocator's peak."""
        baseline = torch.cuda.memory_allocated(runner.device)
        tokens = budget.tokens()
        while True:
            self.progress.stage(f"warming up {runner.device} at {tokens:,} tokens")
            failed = False
            try:
                bytes_per_token = runner.calibrate(tokens)
            except torch.cuda.OutOfMemoryError:
                failed = True  # recover outside the except block (its frame pins tensors)
            if not failed:
                break
            runner.release_cached_memory()
            if tokens <= 1024:
                raise DeviceError(f"{runner.device} cannot run even {tokens} tokens")
            budget.after_oom(tokens)
            tokens //= 2
        memory = DeviceMemory(runner.device, budget, MemoryProbe(runner.device), baseline,
                              bytes_per_token)
        memory.refresh()
        log.info("%s: %s", runner.device, memory.describe())
        return memory

    def _planner(self) -> Planner:
        name = self.spec.name
        return Planner(
            tokenizer=self.tokenizer, max_residues=self.spec.max_residues,
            ledger=self.ledger,
            record_digests=lambda ids: self.writer.record_digests(name, ids),
            has_embeddings=lambda digests: self.writer.has_embeddings(name, digests),
            submit=self.scheduler.submit,
            alias=lambda pairs: self.inbox.put(("alias", pairs)),
            stop=_EitherEvent(self.stop, self.halt), fresh=self.writer.record_count(name) == 0,
            claimed=DigestFilter(self.records.count) if self.writer.embedding_count(name) == 0
            else None)

    def _plan(self, planner: Planner) -> None:
        error = None
        try:
            if self.reader is not None:
                planner.run_prepared(self.reader.chunks())
            else:
                planner.run(self.records.iterate())
        except BaseException as exc:
            error = exc
        finally:
            self.scheduler.close()
            self.inbox.put(("planned", error))

    def _loop(self, workers: list[DeviceWorker], committer: Committer, planner: Planner) -> None:
        alive = {w.index for w in workers}
        planned = False
        while True:
            try:
                message = self.inbox.get(timeout=GROUP_SECONDS)
            except queue.Empty:
                message = None
            if isinstance(message, BatchOutcome):
                self._on_outcome(message)
            elif isinstance(message, WorkerExit):
                alive.discard(message.device)
                self._on_worker_exit(message, alive)
            elif message is not None and message[0] == "alias":
                self.group.extend(CommitEntry(d, (rid,), None) for d, rid in message[1])
                self.group_rows += len(message[1])
            elif message is not None and message[0] == "planned":
                planned = True
                if message[1] is not None:
                    raise message[1]
            if committer.error is not None:
                raise committer.error
            self._flush(committer)
            self._report_progress(workers, committer, planner)
            if self.stop.is_set():
                self.halt.set()
                self.summary.interrupted = True
                if not self.scheduler.in_flight() or not alive:
                    return
            elif planned and self.scheduler.finished and self.inbox.empty():
                return

    def _on_outcome(self, outcome: BatchOutcome) -> None:
        batch = outcome.batch
        if outcome.kind == "ok":
            self.scheduler.complete(batch.batch_id)
            result = outcome.result
            digests = [item.digest for item in batch.items]
            vectors = result.vectors
            if not result.finite.all():
                rows = np.flatnonzero(result.finite).tolist()
                for i in np.flatnonzero(~result.finite).tolist():
                    self._fail(digests[i], "its embedding has non-finite values (overflow at "
                               "this precision); rerun it with --precision fp32")
                digests = [digests[i] for i in rows]
                vectors = {o: [v[i] for i in rows] for o, v in vectors.items()}
            if digests:
                ids = self.ledger.to_committing_many(digests)
                self.group.append(CommitRows(digests, ids, {o: vectors[o] for o in self.spec.outputs}))
                self.group_rows += len(digests)
        elif outcome.kind == "oom":
            for item in self.scheduler.out_of_memory(batch.batch_id):
                self._fail(item.digest, f"does not fit in device memory alone ({item.n_tokens} tokens)")
        else:
            self.scheduler.fail(batch.batch_id)
            name = self.workers[outcome.device].runner.device
            raise DeviceError(f"device {outcome.device} ({name}) failed on a batch: "
                              f"{outcome.error.__class__.__name__}: {outcome.error}; what was "
                              "committed before is intact, rerun to resume") from outcome.error

    def _fail(self, digest: bytes, reason: str) -> None:
        for record_id in self.ledger.drop(digest):
            self.summary.failed.append((record_id, reason))
            log.error("sequence %r failed: %s", record_id, reason)

    def _on_worker_exit(self, message: WorkerExit, alive: set[int]) -> None:
        if message.error is None:
            return
        requeued = self.scheduler.device_lost(message.device)
        name = self.workers[message.device].runner.device
        log.error("device %d (%s) stopped (%s: %s); %d sequences requeued on the other devices",
                  message.device, name, message.error.__class__.__name__, message.error, requeued)
        if not alive:
            raise DeviceError(f"device {message.device} ({name}) failed and no device is left: "
                              f"{message.error.__class__.__name__}: {message.error}") from message.error

    def _flush(self, committer: Committer) -> None:
        """Hand the open group to the committer once it is large or old enough."""
        due = self.group_rows >= self.config.commit_every or (
            time.monotonic() - self.group_started >= GROUP_SECONDS)
        if due:
            if self.group:
                committer.put(self.group)
                self.group, self.group_rows = [], 0
            self.group_started = time.monotonic()

    def _report_progress(self, workers: list[DeviceWorker], committer: Committer,
                         planner: Planner) -> None:
        counts = committer.snapshot()
        elapsed = max(1e-9, time.perf_counter() - self.started)
        devices = tuple(DeviceProgress(w.stats.name, w.stats.tokens / elapsed, w.budget.tokens(),
                                       min(1.0, w.stats.busy_seconds / elapsed))
                        for w in workers)
        self.progress.update(ProgressSnapshot(
            committed_records=counts.records, total_records=self.records.count,
            tokens_done=sum(w.stats.tokens for w in workers),
            elapsed=elapsed, devices=devices, stored_records=planner.counts.stored,
            failed_records=len(self.summary.failed)))

    def _summarize(self, workers: list[DeviceWorker], committer: Committer, planner: Planner,
                   seconds: float, pending: tuple[int, int] = (0, 0)) -> None:
        """Fill the summary from what is committed (plus ``pending``: sequences and records
        of a group about to be committed)."""
        counts = committer.snapshot()
        counts.sequences += pending[0]
        counts.records += pending[1]
        s = self.summary
        s.truncated = planner.counts.truncated
        s.already_stored = planner.counts.stored
        s.deduplicated = planner.counts.aliased
        s.embedded = counts.sequences
        s.committed_records = counts.records
        s.commit_transactions, s.commit_seconds = counts.transactions, counts.busy_seconds
        s.tokens = sum(w.stats.tokens for w in workers)
        s.embed_seconds = seconds
        s.residues = planner.counts.residues_new
        # one definition of tokens/s everywhere: tokens over the embedding time, so the
        # devices' rates add up to the run's; busy is the device's compute time over it
        s.devices = [{"device": w.stats.name, "batches": w.stats.batches,
                      "sequences": w.stats.sequences, "tokens": w.stats.tokens,
                      "busy_seconds": w.stats.busy_seconds,
                      "busy_fraction": min(1.0, w.stats.busy_seconds / seconds) if seconds else 0.0,
                      "tokens_per_second": w.stats.tokens / seconds if seconds else 0.0,
                      "oom_events": w.stats.oom_events} for w in workers]


class _EitherEvent:
    """Set when either event is: the planner stops reading on a stop request (at once, not
    when the loop next looks) and on a halt (an error, the end)."""

    def __init__(self, first: threading.Event, second: threading.Event):
        self.first, self.second = first, second

    def is_set(self) -> bool:
        return self.first.is_set() or self.second.is_set()


_relaxed_lock = threading.Lock()
_relaxed_users = 0
_saved_threshold: tuple[int, ...] = ()


@contextlib.contextmanager
def relaxed_collector(young_threshold: int = 50_000):
    """Python's cyclic garbage collector, made to run less during the pipeline: objects alive
    before it (the model, the loaded inputs' bookkeeping) are frozen out of collections, and
    the youngest generation is collected every ``young_threshold`` allocations instead of 700.
    The pipeline allocates and frees millions of short-lived acyclic objects (records, id
    arrays, commit rows) that reference counting frees anyway; with the defaults, collections
    took about a quarter of the host pipeline's time (py-spy, ``tools/bench_esm.py --systems
    host``). The settings are process-wide: the first of overlapping runs changes them and
    the last one out restores them."""
    global _relaxed_users, _saved_threshold
    with _relaxed_lock:
        if _relaxed_users == 0:
            _saved_threshold = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(young_threshold, *_saved_threshold[1:])
        _relaxed_users += 1
    try:
        yield
    finally:
        with _relaxed_lock:
            _relaxed_users -= 1
            if _relaxed_users == 0:
                gc.set_threshold(*_saved_threshold)
                gc.unfreeze()


def _run_id(config: EmbedConfig, spec: TableSpec) -> str:
    parts = [spec.to_json()]
    for path in config.inputs:
        stat = os.stat(path)
        parts.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(),
                           digest_size=12).hexdigest()
