"""Runs one ``embed``: wires the rooms together and owns every thread of the run.

    resolve model → open store, check table → validate input (before any replica)
    → read weights, open table → replicas (one per device) → input reader → planner (thread)
    → scheduler → device workers (one thread per device) → engine loop → committer (thread)

Who owns what, and which queue connects them:

* the **planner** thread iterates the input's prepared chunks (:mod:`gpuengine.inputs`; read
  by a child process or in this thread), submits new work to the :class:`Scheduler` and puts
  :class:`Aliases` on the engine's inbox, then :class:`Planned`;
* each **device worker** thread pulls batches from the scheduler and puts a
  :class:`~gpuengine.worker.BatchOutcome` per batch on the inbox, then a
  :class:`~gpuengine.worker.WorkerExit`;
* the **engine loop** (the caller's thread) is the only reader of the inbox and the only
  producer of commit groups; the **committer** thread takes them from its own queue and is
  the only writer of the store; the **telemetry** thread (GPUs) adjusts token budgets.

The engine loop, in numbered steps:

1. Take the next message: a batch outcome from a worker, aliases from the planner, a worker's
   exit or the planner's end.
2. ``ok``: tell the scheduler, move each finite item's ids from *pending* to *committing* and
   add an entry with its vectors to the open group; non-finite items fail loudly.
3. ``oom``: the scheduler splits and requeues; an item that cannot fit alone fails.
4. Every ``commit_every`` sequences or half a second, hand the open group to the committer.
5. Stop when the planner is done and the scheduler is drained (or on a stop request, once no
   batch is in flight); flush the last group (with the caller's :data:`CompletionRecords`
   when the run completed), wait for the committer, close the run record.

A run whose input is split into *parts* (the daemon's small files, :mod:`gpuengine.run_parts`)
also, in steps 2-4, resolves each part's ids; a part whose last id is resolved has its
completion records added to the open group, and the caller hears once that group is committed.

What a run returns, :class:`~gpuengine.run_summary.RunSummary`, is defined in
:mod:`gpuengine.run_summary` (and importable from here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gpuengine.committer import Committer
from gpuengine.config import EmbedConfig
from gpuengine.errors import DeviceError, InternalError
from gpuengine.inputs import (INPUT_PROCESS_MIN_RECORDS, ChunkReader, RecordSource, open_input,
                              validated_fasta)
from gpuengine.ledger import Ledger
from gpuengine.models.registry import Weights
from gpuengine.packing import ItemBlock, WorkItem
from gpuengine.planner import Planner
from gpuengine.progress import DeviceProgress, NullProgress, ProgressSink, ProgressSnapshot
from gpuengine.replicas import (MemoryTelemetry, ModelChoice, ReplicaPool, RunnerFactory,
                                build_replicas, check_precision, guard_fidelity, run_precision,
                                start_telemetry)
from gpuengine.run_parts import INPUT_COUNTS, PartCompletion, PartLookup, PartTracker, RunPart
from gpuengine.run_store import RunStore, table_spec
from gpuengine.run_summary import RunSummary  # also imported from here by callers
from gpuengine.scheduler import Scheduler
from gpuengine.store import codec
from gpuengine.store.codec import Packed16
from gpuengine.store.schema import TableSpec
from gpuengine.store.writer import (CommitEntry, CommitPart, CommitRows, CompletionRecords,
                                    group_counts)
from gpuengine.validation_workers import SharedPass
from gpuengine.worker import BatchOutcome, DeviceWorker, WorkerExit, device_rows
from gpuengine.writer_parts import PartedCommitter
from gpuengine.writer_process import CommitterProcess

log = logging.getLogger(__name__)

GROUP_SECONDS = 0.5
COLLECT_SECONDS = 10.0
"""While a run holds the cyclic collector paused (:func:`relaxed_collector` with 0), its loop
runs a full collection this often (:func:`collect_if_due`)."""
PROGRESS_SECONDS = 0.1
"""The loop shows progress at most this often (and once more at the end)."""


@dataclass(frozen=True)
class Aliases:
    """Planner → engine loop: (digest, id) pairs to commit as aliases of sequences stored or
    being committed, in order after the vectors already queued."""

    pairs: list[tuple[bytes, str]]


@dataclass(frozen=True)
class Planned:
    """Planner → engine loop: the planner has handed over all its work (``error``: why it
    stopped early)."""

    error: BaseException | None = None


Message = BatchOutcome | WorkerExit | Aliases | Planned
"""What arrives on the engine's inbox."""


def run_embed(config: EmbedConfig, progress: ProgressSink | None = None,
              stop: threading.Event | None = None,
              runner_factory: RunnerFactory | None = None,
              records: RecordSource | None = None,
              replicas: ReplicaPool | None = None,
              completion_records: CompletionRecords[RunSummary] | None = None,
              parts: Sequence[RunPart] | None = None,
              part_completion: PartCompletion[RunSummary] | None = None) -> RunSummary:
    """Embed ``config.inputs`` (or ``records``) into ``config.out``; see the module docstring.

    ``runner_factory(device, precision, outputs)`` replaces the model runner (tests simulate
    devices with it; the benchmark measures the host pipeline with a no-op runner).
    ``replicas`` keeps built replicas across runs (the daemon, ``predict``).
    ``completion_records(summary)`` gives run records (a daemon's job record) to commit in the
    same transaction as the run's last embeddings, when the run completes.
    ``parts`` split the input (``records``: the daemon's small files) into parts that each
    complete on their own: ``part_completion`` gives each part's records, committed with its
    last embeddings, and hears when they are durable (:mod:`gpuengine.run_parts`)."""
    progress = progress or NullProgress()
    stop = stop or threading.Event()
    started = time.perf_counter()
    progress.stage(f"resolving model {config.model}")
    model = ModelChoice.resolve(config)
    store = RunStore(config.out, config.writers)
    try:
        precision, how = run_precision(config, model.fam)
        if runner_factory is None:  # a simulated device runs what its factory makes
            check_precision(precision, model.fam, config)
        lookup = store.check(config.table, precision, how, model.max_residues)
        validating = time.perf_counter()
        if records is None:
            progress.stage("validating input")
            # the ids of a store of parts are looked up in every part: from one read
            # transaction each (nothing writes while the input is validated)
            with lookup.pinned() if store.count > 1 else contextlib.nullcontext():
                records = validated_fasta(config.inputs, model.fam.alphabet,
                                          skip_invalid=config.skip_invalid, stored=lookup,
                                          shard=config.shard, max_residues=model.max_residues,
                                          shared=shared_first_pass(config))
        counts = records.counts()
        validated = time.perf_counter() - validating
        if records.shard is not None:
            progress.stage(f"shard {records.shard.label}: {records.count:,} of "
                           f"{counts['valid_records']:,} records")
        if stop.is_set():  # Ctrl-C while validating: nothing loaded, nothing to drain
            summary = RunSummary(str(config.out), config.table, model.source.name, False,
                                 interrupted=True, **counts)
            summary.wall_seconds = time.perf_counter() - started
            store.close(remove_if_empty=True)
            return summary
        if store.count > 1 and (completion_records is not None or parts is not None):
            raise InternalError("a run that commits records with its last embeddings (the "
                                f"daemon's) writes one store, not {store.count} parts")
        progress.stage(f"reading weights {model.source.path}")
        weights = model.read_weights(replicas)
        if weights.synthetic:
            log.warning("model %s has RANDOM weights (a gpuengine test checkpoint): the "
                        "embeddings mean nothing", model.source.path)
        spec = table_spec(config, model.fam, weights, model.checksum(config.env.cache_dir),
                          model.max_residues, precision)
        store.open_table(spec)
        summary = RunSummary(str(config.out), spec.name, model.source.name, weights.synthetic,
                             validate_seconds=validated, writers=store.count, **counts)
        run = _Run(config, model, weights, spec, store, records, summary, progress, stop,
                   runner_factory, replicas, completion_records)
        if parts is not None:
            run.parts = PartTracker(parts)
            run.part_completion = part_completion
        run.execute()
    except BaseException:
        store.close(remove_if_empty=True)
        raise
    store.close(remove_if_empty=False)
    summary.wall_seconds = time.perf_counter() - started
    return summary


class _Run:
    """One run's threads and state (see the module docstring for the loop)."""

    def __init__(self, config: EmbedConfig, model: ModelChoice, weights: Weights,
                 spec: TableSpec, store: RunStore, records: RecordSource, summary: RunSummary,
                 progress: ProgressSink, stop: threading.Event,
                 runner_factory: RunnerFactory | None, pool: ReplicaPool | None,
                 completion_records: CompletionRecords[RunSummary] | None):
        self.config, self.model, self.weights, self.spec = config, model, weights, spec
        self.tokenizer = model.fam.tokenizer(weights.source)
        self.store = store
        self.records, self.summary = records, summary
        self.progress, self.stop = progress, stop
        self.runner_factory, self.pool = runner_factory, pool
        self.completion_records = completion_records
        self.telemetry: MemoryTelemetry | None = None
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.halt = threading.Event()
        """Workers stop pulling new batches once set (on a stop request, an error, or the end)."""
        self.ledger = Ledger()
        self.scheduler = Scheduler(halt=self.halt)
        self.group: list[CommitPart] = []
        self.group_rows = 0
        """Sequences and aliases in the open group."""
        self.group_started = time.monotonic()
        self.started = time.perf_counter()
        """When embedding started: the one time base of the progress bar and the summary."""
        self.reader: ChunkReader | None = None
        self.workers: list[DeviceWorker] = []
        self.committer: Committer | CommitterProcess | PartedCommitter | None = None
        self.planner_thread: threading.Thread | None = None
        self.parts: PartTracker[RunSummary] | None = None
        self.part_completion: PartCompletion[RunSummary] | None = None
        self.group_extra: dict[str, dict] = {}
        """Run records (the parts' completion records) to commit with the open group."""
        self.groups_put = 0
        """Commit groups handed to the committer (it counts the ones it committed)."""
        self.progress_shown = 0.0
        """When the loop last showed progress (``time.monotonic``)."""

    def execute(self) -> None:
        try:
            # started before the devices, so a reader process's start-up overlaps theirs
            self.reader = open_input(self.records, self.tokenizer, self.spec.max_residues,
                                     self.config.input_in_processes,
                                     _EitherEvent(self.stop, self.halt),
                                     processes=self.config.env.input_processes,
                                     block_bytes=self.config.env.input_block_bytes,
                                     key_prefixes=[self.spec.embedding_key_prefix(o)
                                                   for o in self.spec.outputs])
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
            self.reader.close()  # kills and reaps a child; a planner reading its pipe sees the end
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

    def _execute(self) -> None:
        workers = self._start_workers()
        run_id, self.summary.run_started = self.store.begin_run(
            self.config, self.spec, workers[0].runner.precision, fidelity=self.summary.fidelity)
        self.summary.run_id = run_id
        committer = self.committer = self._committer(run_id)
        lookup = self.store.lookup(self.spec.name)
        planner = Planner(ledger=self.ledger,
                          lookup=lookup if self.parts is None else PartLookup(lookup, self.parts),
                          submit=self.scheduler.submit,
                          alias=lambda pairs: self.inbox.put(Aliases(pairs)),
                          stop=_EitherEvent(self.stop, self.halt),
                          expected_records=self.records.count)
        committer.start()
        planner_thread = threading.Thread(target=self._plan, args=(planner,), daemon=True,
                                          name="gpuengine-planner")  # joined in _stop_threads
        self.progress.start(self.records.count, self.records.residues)
        self.started = time.perf_counter()
        planner_thread.start()
        self.planner_thread = planner_thread
        completed = False
        with relaxed_collector(0):  # paused; the loop collects every COLLECT_SECONDS
            try:
                self._loop(workers, committer, planner)
                completed = not self.summary.interrupted
            finally:
                self._commit_last(workers, committer, planner, completed)
        if committer.error is not None:
            raise committer.error
        self._summarize(workers, committer, planner, time.perf_counter() - self.started)
        status = "interrupted" if self.summary.interrupted else "complete"
        self.store.finish_run(run_id, status, {"failed": len(self.summary.failed),
                                                "embedded": self.summary.embedded,
                                                "committed_records": self.summary.committed_records})

    def _commit_last(self, workers: list[DeviceWorker], committer: Committer, planner: Planner,
                     completed: bool) -> None:
        """After the loop, on every path: halt, commit the open group, wait for the writer,
        show the final progress (everything committed) and close the display."""
        self.halt.set()
        if self.telemetry:
            self.telemetry.stop()
        try:
            extra = None
            if completed and self.completion_records is not None:
                # the caller's records (a job record) go into the same transaction as the
                # run's last embeddings, with the summary those embeddings complete: the
                # groups handed over earlier committed first, so the counts hold them too
                committer.wait_idle()
                self._summarize(workers, committer, planner, time.perf_counter() - self.started,
                                group_counts(self.group))
                extra = dict(self.completion_records(self.summary))
            if completed and self.parts is not None:
                self._complete_parts(workers, committer, planner, last=True)
            self._put(committer, extra)
            waited = time.perf_counter()
            committer.finish()
            self.summary.commit_wait_seconds = time.perf_counter() - waited
            if self.parts is not None and (completed or self.summary.interrupted) \
                    and committer.error is None:
                self._announce_durable(committer)
            self._report_progress(workers, committer, planner)
        finally:
            self.progress.close()

    def _committer(self, run_id: str) -> Committer | CommitterProcess | PartedCommitter:
        """The run's writers: one child process per part store (:mod:`gpuengine.writer_parts`)
        for a store of several parts; for one store, its single writer in a child process
        (:mod:`gpuengine.writer_process`) for an input of at least
        :data:`~gpuengine.inputs.INPUT_PROCESS_MIN_RECORDS` records (the size from which input
        processes are used: there its start-up, about 0.1 s, is small beside the puts it takes
        off this process's interpreter lock) or as ``GPUENGINE_WRITER_PROCESS`` says; else a
        thread of this process."""
        writers = self.store.writers
        if len(writers) > 1:
            return PartedCommitter([w.path for w in writers], self.spec, run_id, self.ledger,
                                   map_sizes=[w.map_size for w in writers])
        writer = writers[0]
        choice = self.config.env.writer_process
        if choice is None:
            choice = self.records.count >= INPUT_PROCESS_MIN_RECORDS
        if choice:
            return CommitterProcess(writer.path, self.spec, run_id, self.ledger,
                                    map_size=writer.map_size)
        return Committer(writer, self.spec.name, run_id, self.ledger)

    def _start_workers(self) -> list[DeviceWorker]:
        """``--replicas-per-gpu`` warmed-up replicas on every device, the fidelity guard of a
        lossy precision on the first (FidelityError before anything is written, before any
        worker starts), a worker thread per replica, the telemetry."""
        replicas = build_replicas(self.config, self.model.fam, self.weights, self.spec,
                                  self.progress, runner_factory=self.runner_factory,
                                  pool=self.pool)
        for replica in replicas:  # fp32 for the guard, whatever a pooled replica's last run set
            hand_over_in_store_dtype(replica.runner, None)
        report = guard_fidelity(self.config, self.model.fam, self.weights, self.spec,
                                replicas[0], self.records, self.tokenizer.encode, self.progress,
                                runner_factory=self.runner_factory, pool=self.pool)
        if report is not None:
            self.summary.fidelity = report.to_json()
        for replica in replicas:  # after the guard, which compares fp32 vectors
            hand_over_in_store_dtype(replica.runner, self.spec)
        self.workers = [DeviceWorker(index, replica.runner, replica.budget, self.scheduler,
                                     self.inbox, self.halt, name=replica.name or None)
                        for index, replica in enumerate(replicas)]
        self.telemetry = start_telemetry(replicas)
        for worker in self.workers:
            worker.start()
        return self.workers

    def _plan(self, planner: Planner) -> None:
        error = None
        try:
            chunks = self.reader.chunks()
            planner.run(chunks if self.parts is None else self.parts.observe(chunks))
        except BaseException as exc:
            error = exc
        finally:
            self.scheduler.close()
            self.inbox.put(Planned(error))

    def _loop(self, workers: list[DeviceWorker], committer: Committer, planner: Planner) -> None:
        alive = {w.index for w in workers}
        planned = False
        collected = time.monotonic()
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
            elif isinstance(message, Aliases):
                self.group.extend(CommitEntry(d, (rid,), None) for d, rid in message.pairs)
                self.group_rows += len(message.pairs)
                if self.parts is not None:
                    self.parts.aliased(rid for _, rid in message.pairs)
            elif isinstance(message, Planned):
                planned = True
                if message.error is not None:
                    raise message.error
            if committer.error is not None:
                raise committer.error
            if self.parts is not None:
                self._complete_parts(workers, committer, planner)
            self._flush(committer)
            if self.parts is not None:
                self._announce_durable(committer)
            now = time.monotonic()
            collected = collect_if_due(collected, now)
            if now - self.progress_shown >= PROGRESS_SECONDS:  # not per batch: it reads
                self.progress_shown = now  # every worker's and the committer's counters
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
            block = batch.block
            vectors = result.vectors
            if np.count_nonzero(result.finite) != len(result.finite):
                rows = np.flatnonzero(result.finite).tolist()
                for i in np.flatnonzero(~result.finite).tolist():
                    self._fail(block.digests[i], "its embedding has non-finite values (overflow "
                               "at this precision); rerun it with --precision fp32")
                block = block.take(rows)
                vectors = {o: [v[i] for i in rows] for o, v in vectors.items()}
            if len(block):
                digests = block.digests
                ids = self.ledger.to_committing_many(digests)
                if self.parts is not None:
                    self.parts.committed(ids)
                rows = CommitRows(digests, ids, {o: vectors[o] for o in self.spec.outputs},
                                  key_columns(block))
                rows.packed_digests()  # now, while the digests are in the cache
                self.group.append(rows)
                self.group_rows += len(digests)
        elif outcome.kind == "oom":
            for item in self.scheduler.out_of_memory(batch.batch_id):
                self._fail(item.digest, f"does not fit in device memory alone ({item.n_tokens} tokens)")
        else:
            self.scheduler.fail(batch.batch_id)
            name = self.workers[outcome.device].stats.name
            raise DeviceError(f"device {outcome.device} ({name}) failed on a batch: "
                              f"{outcome.error.__class__.__name__}: {outcome.error}; what was "
                              "committed before is intact, rerun to resume") from outcome.error

    def _fail(self, digest: bytes, reason: str) -> None:
        ids = self.ledger.drop(digest)
        for record_id in ids:
            self.summary.failed.append((record_id, reason))
            log.error("sequence %r failed: %s", record_id, reason)
        if self.parts is not None:
            self.parts.failed(ids, reason)

    def _on_worker_exit(self, message: WorkerExit, alive: set[int]) -> None:
        if message.error is None:
            return
        requeued = self.scheduler.device_lost(message.device)
        name = self.workers[message.device].stats.name
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
            self._put(committer)
            self.group_started = time.monotonic()

    def _put(self, committer: Committer, extra: dict[str, dict] | None = None) -> None:
        """Hand the open group (and the run records that go with it) to the committer."""
        extra = {**self.group_extra, **(extra or {})}
        if self.group or extra:
            committer.put(self.group, extra_runs=extra or None)
            self.groups_put += 1
        self.group, self.group_rows, self.group_extra = [], 0, {}

    def _complete_parts(self, workers: list[DeviceWorker], committer: Committer,
                        planner: Planner, last: bool = False) -> None:
        """Each part whose last id was resolved: its completion records join the open group.
        ``last`` (the run completed): a part still missing ids is a bug of the accounting;
        its records are committed anyway (every record of a completed run is), loudly."""
        done = self.parts.take_complete()
        if last:
            stragglers = self.parts.incomplete()
            for part in stragglers:
                log.error("part %s: %d of its ids were never accounted for; its records are "
                          "committed with the run's last group", self.parts.parts[part].name,
                          self.parts.remaining(part))
            done += stragglers
        for part in done:
            summary = self._part_summary(part, workers, committer, planner)
            if self.part_completion is not None:
                self.group_extra.update(self.part_completion.records(part, summary))
            self.parts.waiting.append((part, summary, self.groups_put + 1))

    def _announce_durable(self, committer: Committer) -> None:
        """Tell the caller about each part whose group the committer has committed."""
        for part, summary in self.parts.take_durable(committer.snapshot().groups):
            if self.part_completion is not None:
                self.part_completion.committed(part, summary)

    def _part_summary(self, part: int, workers: list[DeviceWorker], committer: Committer,
                      planner: Planner) -> RunSummary:
        """A part's summary: its own counts; the run's model, store, devices and times so far
        (``group``: the run's parts and embedded sequences so far)."""
        info, counts = self.parts.parts[part], self.parts.counts[part]
        seconds = time.perf_counter() - self.started
        run = committer.snapshot()
        summary = dataclasses.replace(
            self.summary, **{k: info.counts.get(k, 0) for k in INPUT_COUNTS},
            truncated=counts.truncated, already_stored=counts.already_stored,
            embedded=counts.embedded, deduplicated=counts.deduplicated,
            committed_records=counts.committed_records, failed=list(counts.failed),
            tokens=sum(w.stats.tokens for w in workers), embed_seconds=seconds,
            devices=device_rows(workers, seconds), interrupted=False)
        summary.group = {"parts": len(self.parts.parts), "part": part,
                         "run_embedded": run.sequences + group_counts(self.group)[0],
                         "run_records": self.records.count}
        return summary

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
        s.devices = device_rows(workers, seconds)


def shared_first_pass(config: EmbedConfig) -> SharedPass | None:
    """How the first pass over the input may use validation processes: as many as the input
    processes of a DNA run (the first pass costs the same a read for every model) and in
    their blocks; for large files, or every file where input processes are asked for always
    (``GPUENGINE_INPUT_PROCESS=1``); none where never (``=0``)."""
    from gpuengine.input_workers import process_count

    choice = config.input_in_processes
    if choice is False:
        return None
    shared = SharedPass(process_count(config.env.input_processes, heavy=True),
                        block_bytes=config.env.input_block_bytes)
    return dataclasses.replace(shared, min_bytes=0) if choice else shared


def hand_over_in_store_dtype(runner, spec: TableSpec | None) -> None:
    """Have ``runner`` hand its vectors over in the table's store dtype when that is float16
    (:attr:`~gpuengine.runner.Runner.hand_over_dtype`; fp32 otherwise, as they are pooled, and
    when ``spec`` is None). Runners without the attribute (tests' simulated devices) are left
    as they are."""
    if hasattr(runner, "hand_over_dtype"):
        float16 = spec is not None and spec.store_dtype == "float16"
        runner.hand_over_dtype = "float16" if float16 else None


def key_columns(items: ItemBlock | Sequence[WorkItem]) -> tuple[Packed16, ...]:
    """The embedding keys the input side computed for a batch's items, column-wise: per
    output, each item's key, packed (:attr:`CommitRows.embedding_keys`: the part split and
    the writer process's frame take them as they are); () when an item has none (the writer
    computes them then). One join per output, no step per item in the interpreter."""
    block = ItemBlock.of(items)
    if not len(block):
        return ()
    columns = tuple(map(b"".join, block.keys))
    if any(len(column) != codec.DIGEST_SIZE * len(block) for column in columns):
        raise InternalError("a work item's embedding key is not 16 bytes")
    return tuple(map(Packed16, columns))


class _EitherEvent:
    """Set when either event is: the planner stops reading on a stop request (at once, not
    when the loop next looks) and on a halt (an error, the end)."""

    def __init__(self, first: threading.Event, second: threading.Event):
        self.first, self.second = first, second

    def is_set(self) -> bool:
        return self.first.is_set() or self.second.is_set()


def collect_if_due(last: float, now: float) -> float:
    """A full collection when the collector is paused (threshold 0: a run's
    :func:`relaxed_collector`) and :data:`COLLECT_SECONDS` have passed since ``last``;
    returns when the last collection was (``last`` or ``now``)."""
    if gc.get_threshold()[0] != 0 or now - last < COLLECT_SECONDS:
        return last
    gc.collect()
    return now


_relaxed_lock = threading.Lock()
_relaxed_users = 0
_saved_threshold: tuple[int, ...] = ()


@contextlib.contextmanager
def relaxed_collector(young_threshold: int = 50_000):
    """Python's cyclic garbage collector, made to run less during the pipeline: objects alive
    before it (the model, the loaded inputs' bookkeeping) are frozen out of collections, and
    the youngest generation is collected every ``young_threshold`` allocations instead of 700
    (0: never by allocation count; the caller collects, as the engine loop does with
    :func:`collect_if_due`). The pipeline allocates and frees millions of short-lived acyclic
    objects (records, work items, commit rows) that reference counting frees anyway; with the
    defaults, collections took about a quarter of the host pipeline's time (py-spy,
    ``tools/bench_esm.py --systems host``), and with every 50 000 allocations still about a
    tenth of the planner's (the scheduler's window of live work items scanned again and
    again: ``tools/host_stage_costs.py`` planner 1.5 -> 1.14 µs a read paused, VM). A run
    pauses it and collects every :data:`COLLECT_SECONDS` instead (a full collection of the
    live work, tens of milliseconds). The settings are process-wide: the first of
    overlapping runs changes them and the last one out restores them."""
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
