"""``gpuengine serve --job predict``: each claimed reads file goes through the VirNucPro
prediction (:func:`gpuengine.workflows.virnucpro.pipeline.run_predict`) with the daemon's
replica pool, so DNABERT-S and ESM-2 stay loaded on every GPU between files. Embeddings go to
the daemon's store (tables ``dnabert`` and ``esm``: a file that repeats earlier reads computes
nothing again); each file's outputs go to ``DIR/predictions/<file base>-<sha256 prefix>/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

from gpuengine.daemon.files import utc_now
from gpuengine.daemon.jobs import Claim, Job, Loaded, Report, check_tables, throwaway_dir, versions
from gpuengine.progress import ProgressSink

WARMUP_READ = ">gpuengine-warmup\n" + "ATG" + "GCT" * 49 + "\n"
"""A 150-bp read whose first forward frame is stop-free, so both models run."""


class PredictJob(Job):
    """Predict each file with the options of ``template`` (a
    :class:`~gpuengine.workflows.virnucpro.pipeline.PredictConfig`; its reads, out and store are
    set per file), embeddings into ``store``, outputs under ``directory/predictions/``."""

    def __init__(self, template: Any, directory: Path, store: Path):
        self.template = template
        self.directory = Path(directory)
        self.store = store
        self.specs: list = []
        """The specs of the tables the warm-up wrote (what the daemon's store must match)."""
        self.identity: dict[str, Any] = {}

    def predictions_dir(self, path: Path, sha256: str) -> Path:
        from gpuengine.workflows.virnucpro.pipeline import input_base

        return self.directory / "predictions" / f"{input_base(path)}-{sha256[:8]}"

    def load(self, pool: Any, progress: ProgressSink, stop: threading.Event) -> Loaded | None:
        """DNABERT-S and ESM-2 on every device: one built-in read into a throw-away store."""
        from gpuengine.store.reader import EmbeddingStore
        from gpuengine.workflows.virnucpro.pipeline import run_predict

        with throwaway_dir(self.directory) as tmp:
            reads = tmp / "warmup.fa"
            reads.write_text(WARMUP_READ)
            config = dataclasses.replace(self.template, reads=reads, out=tmp / "out",
                                         store=tmp / "store.lmdb")
            summary = run_predict(config, progress, stop, replicas=pool)
            if summary.interrupted:
                return None
            self.specs = []
            for table in summary.embed:
                with EmbeddingStore(config.store_path, table=table) as store:
                    self.specs.append(store.spec)
        self.identity = identity(self.template)
        board = {"model": {"job": "predict", "esm": self.template.esm_model,
                           "dnabert": self.template.dnabert_model}}
        return Loaded(self.identity, board, "predict models loaded")

    def check_store(self) -> None:
        check_tables(self.store, self.specs)

    def run(self, claim: Claim, pool: Any, progress: ProgressSink,
            stop: threading.Event) -> Any:
        """Predict one claimed file; returns the :class:`PredictSummary`."""
        from gpuengine.workflows.virnucpro.pipeline import run_predict

        config = dataclasses.replace(self.template, reads=claim.path.resolve(), store=self.store,
                                     out=self.predictions_dir(claim.path, claim.sha256))
        return run_predict(config, progress, stop, replicas=pool)

    def record(self, claim: Claim, summary: Any, seconds: float) -> dict[str, Any]:
        """Outputs are written; the record says where, with the counts of every stage."""
        embed = summary.embed.values()
        counts = {"reads": summary.reads, "empty_reads": summary.empty_reads,
                  "chunks": summary.chunks, "frames": summary.frames,
                  "virus_chunks": summary.virus_chunks,
                  "embedded": sum(e.get("embedded", 0) for e in embed),
                  "already_stored": sum(e.get("already_stored", 0) for e in embed),
                  "committed_records": sum(e.get("committed_records", 0) for e in embed)}
        out = self.predictions_dir(claim.path, claim.sha256)
        return {"job": claim.key, "kind": "predict", "file": claim.name, "sha256": claim.sha256,
                "status": "complete", "outputs": str(out.relative_to(self.directory)),
                "counts": counts, "stage_seconds": summary.stage_seconds,
                "fidelity": summary.embed.get("esm", {}).get("fidelity"),
                "seconds": round(seconds, 3),
                "sequences_per_second": summary.reads / seconds if seconds else 0.0,
                "attempts": claim.attempt, "options": self.identity, "versions": versions(),
                "finished_at": utc_now(), "daemon_pid": os.getpid()}

    def report(self, summary: Any, record: dict[str, Any], seconds: float) -> Report:
        return Report(dict(record["counts"]),
                      f"{summary.reads} reads, {summary.frames} frames, {summary.virus_chunks} "
                      f"chunks called virus; outputs in {record['outputs']}")


def identity(template: Any) -> dict[str, Any]:
    """What makes two predict jobs of the same content the same job."""
    classifier = hashlib.sha256(Path(template.classifier).read_bytes()).hexdigest()
    return {"job": "predict", "length": template.length, "classifier_sha256": classifier,
            "esm_model": template.esm_model, "esm_layer": template.esm_layer,
            "dnabert_model": template.dnabert_model, "precision": template.precision,
            "skip_invalid": template.skip_invalid}
