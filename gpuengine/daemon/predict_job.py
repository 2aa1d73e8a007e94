"""``gpuengine serve --job predict``: each claimed reads file goes through the VirNucPro
prediction (:func:`gpuengine.workflows.virnucpro.pipeline.run_predict`) with the daemon's
replica pool, so DNABERT-S and ESM-2 stay loaded on every GPU between files. Embeddings go to
the daemon's store (tables ``dnabert`` and ``esm``: a file that repeats earlier reads computes
nothing again); each file's outputs go to ``DIR/predictions/<file base>-<sha256 prefix>/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gpuengine.daemon.constants import WARMUP_PREFIX

WARMUP_READ = ">gpuengine-warmup\n" + "ATG" + "GCT" * 49 + "\n"
"""A 150-bp read whose first forward frame is stop-free, so both models run."""


def predictions_dir(watch: Path, path: Path, sha256: str) -> Path:
    from gpuengine.workflows.virnucpro.pipeline import input_base

    return watch / "predictions" / f"{input_base(path)}-{sha256[:8]}"


def run_file(template, store: Path, watch: Path, path: Path, sha256: str, progress, stop, pool):
    """Predict one claimed file; returns the :class:`PredictSummary`."""
    from gpuengine.workflows.virnucpro.pipeline import run_predict

    config = dataclasses.replace(template, reads=path.resolve(), store=store,
                                 out=predictions_dir(watch, path, sha256))
    return run_predict(config, progress, stop, replicas=pool)


def warm_up(template, directory: Path, progress, stop, pool) -> tuple[Any, list]:
    """Load both models on every device (one built-in read into a throw-away store); returns
    the summary and the specs of the tables written (what the daemon's store must match)."""
    from gpuengine.store.reader import EmbeddingStore
    from gpuengine.workflows.virnucpro.pipeline import run_predict

    tmp = Path(tempfile.mkdtemp(prefix=WARMUP_PREFIX, dir=directory))
    try:
        reads = tmp / "warmup.fa"
        reads.write_text(WARMUP_READ)
        config = dataclasses.replace(template, reads=reads, out=tmp / "out",
                                     store=tmp / "store.lmdb")
        summary = run_predict(config, progress, stop, replicas=pool)
        if any(e.get("interrupted") for e in summary.embed.values()):
            return summary, []
        specs = []
        for table in summary.embed:
            with EmbeddingStore(config.store_path, table=table) as store:
                specs.append(store.spec)
        return summary, specs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def identity(template) -> dict[str, Any]:
    """What makes two predict jobs of the same content the same job."""
    classifier = hashlib.sha256(Path(template.classifier).read_bytes()).hexdigest()
    return {"job": "predict", "length": template.length, "classifier_sha256": classifier,
            "esm_model": template.esm_model, "esm_layer": template.esm_layer,
            "dnabert_model": template.dnabert_model, "precision": template.precision,
            "skip_invalid": template.skip_invalid}


def job_record(name: str, sha256: str, key: str, summary, attempt: int, seconds: float,
               watch: Path, path: Path, extra: dict[str, Any]) -> dict[str, Any]:
    counts = {"reads": summary.reads, "empty_reads": summary.empty_reads,
              "chunks": summary.chunks, "frames": summary.frames,
              "virus_chunks": summary.virus_chunks,
              "embedded": sum(e.get("embedded", 0) for e in summary.embed.values()),
              "already_stored": sum(e.get("already_stored", 0) for e in summary.embed.values()),
              "committed_records": sum(e.get("committed_records", 0)
                                       for e in summary.embed.values())}
    out = predictions_dir(watch, path, sha256)
    return {"job": key, "kind": "predict", "file": name, "sha256": sha256, "status": "complete",
            "outputs": str(out.relative_to(watch)), "counts": counts,
            "stage_seconds": summary.stage_seconds, "seconds": round(seconds, 3),
            "sequences_per_second": summary.reads / seconds if seconds else 0.0,
            "attempts": attempt, **extra}
