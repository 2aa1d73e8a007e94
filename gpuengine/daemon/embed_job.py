"""``gpuengine serve --job embed`` (the default): each claimed FASTA file is embedded into the
daemon's store by :func:`gpuengine.engine.run_embed` with the daemon's replica pool, and its job
record is committed in the same transaction as the file's last embeddings; small files share
one run, each still completing on its own (:mod:`gpuengine.daemon.groups`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from typing import Any, Callable, Iterator

from gpuengine.config import EmbedConfig
from gpuengine.daemon.books import JobBook
from gpuengine.daemon.constants import MAX_LISTED_FAILURES, WARMUP_RECORD
from gpuengine.daemon.files import utc_now
from gpuengine.daemon.jobs import Claim, Job, Loaded, Report, check_tables, throwaway_dir, versions
from gpuengine.progress import ProgressSink

RunFunction = Callable[..., Any]
"""``run(config, progress, stop, replicas=pool) -> RunSummary`` (engine.run_embed)."""


class EmbedJob(Job):
    """Embed each file with the options of ``config`` (its ``inputs`` are replaced by the
    claimed file) into ``config.out``."""

    commits_record = True
    groups = True

    def __init__(self, config: EmbedConfig, directory: Any, run: RunFunction | None = None):
        self.config = config
        self.directory = directory
        """The watched directory (the warm-up's scratch folder goes there)."""
        self._run = run
        self.table_spec: Any = None
        """The store table's :class:`~gpuengine.store.schema.TableSpec`, once loaded."""

    def _call_run(self, config: EmbedConfig, progress: ProgressSink, stop: threading.Event,
                  pool: Any, final_records=None, **options):
        if self._run is None:
            from gpuengine.engine import run_embed

            self._run = run_embed
        if final_records is not None:
            options["completion_records"] = final_records
        return self._run(config, progress, stop, replicas=pool, **options)

    def load(self, pool: Any, progress: ProgressSink, stop: threading.Event) -> Loaded | None:
        """One tiny record into a throw-away store, with the real options (so the replicas
        built are the ones every run reuses)."""
        from gpuengine.store.reader import EmbeddingStore

        with throwaway_dir(self.directory) as tmp:
            fasta = tmp / "warmup.fa"
            fasta.write_text(WARMUP_RECORD)
            # the one synthetic record is no file's input: at fp8 the guard judges each file
            # (a threshold of -1 accepts any measurement), not the daemon's start
            config = dataclasses.replace(self.config, inputs=(fasta,),
                                         out=tmp / "store.lmdb", skip_invalid=False,
                                         fp8_min_cosine=-1.0)
            summary = self._call_run(config, progress, stop, pool)
            if summary.interrupted:
                return None
            with EmbeddingStore(config.out, table=config.table) as store:
                self.table_spec = spec = store.spec
        identity = {"table": spec.name, "model_fingerprint": spec.model.fingerprint().hex(),
                    "outputs": sorted(o.label for o in spec.outputs),
                    "store_dtype": spec.store_dtype, "max_residues": spec.max_residues,
                    "skip_invalid": self.config.skip_invalid,
                    "precision": self.config.precision}
        board = {"model": {"name": spec.model.name, "family": spec.model.family,
                           "sha256": spec.model.sha256, "table": spec.name,
                           "outputs": [o.label for o in spec.outputs]},
                 "devices": summary.devices}
        devices = ", ".join(d["device"] for d in summary.devices) or "?"
        return Loaded(identity, board, f"model {spec.model.name} loaded on {devices}")

    def check_store(self) -> None:
        check_tables(self.config.out, [self.table_spec])

    def run(self, claim: Claim, pool: Any, progress: ProgressSink,
            stop: threading.Event) -> Any:
        config = dataclasses.replace(self.config, inputs=(claim.path.resolve(),))

        def job_records(summary: Any) -> dict[str, dict]:
            """The job record, committed by the engine with the file's last embeddings."""
            record = self.record(claim, summary, time.perf_counter() - claim.started)
            return {claim.key: JobBook.run_record(claim.key, record)}

        return self._call_run(config, progress, stop, pool, job_records)

    @contextlib.contextmanager
    def validator(self) -> Iterator[Callable[[Claim], Any]]:
        """``validate(claim) -> GroupFile`` for the files of a group: each on its own,
        against the store's table (an id it maps to another sequence is a problem)."""
        from gpuengine.daemon.groups import validate_member
        from gpuengine.models.registry import family
        from gpuengine.store.writer import StoreWriter

        alphabet = family(self.table_spec.model.family).alphabet
        with StoreWriter(self.config.out) as writer, \
                writer.lookup(self.config.table).pinned() as lookup:  # one read transaction
            yield lambda claim: validate_member(claim, alphabet, self.config.skip_invalid,
                                                lookup)

    def run_group(self, files: list, pool: Any, progress: ProgressSink, stop: threading.Event,
                  finished: Callable[[Claim, Any, dict], None]) -> Any:
        """One run over the validated ``files`` (:class:`~gpuengine.daemon.groups.GroupFile`);
        each file's job record is committed with its last embeddings, then
        ``finished(claim, summary, record)`` is called while the run goes on."""
        from gpuengine.daemon.groups import combined_source
        from gpuengine.run_parts import RunPart

        config = dataclasses.replace(self.config,
                                     inputs=tuple(f.claim.path.resolve() for f in files))
        parts = [RunPart(f.claim.name, f.ids, f.source.count, f.source.counts()) for f in files]
        return self._call_run(config, progress, stop, pool, records=combined_source(files),
                              parts=parts, part_completion=_GroupRecords(self, files, finished))

    def record(self, claim: Claim, summary: Any, seconds: float) -> dict[str, Any]:
        status = "partial" if summary.failed else "complete"
        group = getattr(summary, "group", None) or {}
        embedded = group.get("run_embedded", summary.embedded)
        seq_rate = embedded / summary.embed_seconds if summary.embed_seconds else 0.0
        counts = {k: getattr(summary, k) for k in (
            "records_read", "valid_records", "invalid_skipped", "duplicate_records", "truncated",
            "already_stored", "deduplicated", "embedded", "committed_records")}
        spec = self.table_spec
        return {
            "job": claim.key, "file": claim.name, "sha256": claim.sha256,
            "size": claim.size if claim.size is not None else os.path.getsize(claim.path),
            "status": status,
            "exit_code": summary.exit_code, "store": str(self.config.out),
            "table": summary.table,
            "model": {"name": spec.model.name if spec else summary.model,
                      "sha256": spec.model.sha256 if spec else None,
                      "synthetic_weights": summary.synthetic_weights},
            "options": self.options(), "counts": counts,
            "failed_count": len(summary.failed),
            "failed": [{"id": rid, "reason": why}
                       for rid, why in summary.failed[:MAX_LISTED_FAILURES]],
            "seconds": round(seconds, 3), "embed_seconds": summary.embed_seconds,
            "sequences_per_second": seq_rate, "tokens_per_second": summary.tokens_per_second,
            "devices": summary.devices, "attempts": claim.attempt, "finished_at": utc_now(),
            "versions": versions(), "daemon_pid": os.getpid(),
            "engine_run": engine_run(summary), "fidelity": getattr(summary, "fidelity", None),
            **({"group": {"files": group["parts"], "run_id": summary.run_id or None,
                          "run_records": group["run_records"]}} if group else {})}

    def report(self, summary: Any, record: dict[str, Any], seconds: float) -> Report:
        failed = f", {len(summary.failed)} sequences failed" if summary.failed else ""
        message = (f"{summary.committed_records + summary.already_stored} records "
                   f"({summary.embedded} embedded, {summary.already_stored} already stored)"
                   f"{failed} in {seconds:.1f} s")
        return Report({**record["counts"], "failed": len(summary.failed)}, message,
                      {"devices": summary.devices})

    def options(self) -> dict[str, Any]:
        """The run options a job record lists."""
        e = self.config
        return {"model": e.model, "table": e.table, "layers": list(e.layers),
                "pools": list(e.pools), "precision": e.precision, "store_dtype": e.store_dtype,
                "max_residues": e.max_residues, "skip_invalid": e.skip_invalid,
                "gpus": e.devices, "max_tokens": e.max_tokens,
                "replicas_per_gpu": e.replicas_per_gpu,
                **({"fp8_min_cosine": e.fp8_min_cosine} if e.precision == "fp8" else {})}


class _GroupRecords:
    """A group run's :class:`~gpuengine.run_parts.PartCompletion`: each file's job record."""

    def __init__(self, job: EmbedJob, files: list, finished: Callable[[Claim, Any, dict], None]):
        self.job, self.claims, self.finished = job, [f.claim for f in files], finished
        self.made: dict[int, dict[str, Any]] = {}

    def records(self, part: int, summary: Any) -> dict[str, dict]:
        claim = self.claims[part]
        record = self.made[part] = self.job.record(claim, summary,
                                                   time.perf_counter() - claim.started)
        return {claim.key: JobBook.run_record(claim.key, record)}

    def committed(self, part: int, summary: Any) -> None:
        self.finished(self.claims[part], summary, self.made.pop(part))


def engine_run(summary: Any) -> dict[str, Any]:
    """The engine's run record for this file once this run's last group is committed: counts
    over every attempt (an interrupted one included) and how often it was resumed. For a file
    of a group (whose run record counts the whole group): this attempt's counts (what earlier
    attempts committed shows as ``already_stored``)."""
    start = getattr(summary, "run_started", None) or {}
    earlier = {} if getattr(summary, "group", None) else start  # a group's: the whole group's
    return {"run_id": summary.run_id or None, "resumes": start.get("resumes", 0),
            "started_at": start.get("started_at"),
            "committed_records": earlier.get("committed_records", 0) + summary.committed_records,
            "committed_sequences": earlier.get("committed_sequences", 0) + summary.embedded}
