"""``--precision fp8`` and ``--fp8-min-cosine`` through every front end: embed, predict and
serve accept and check the threshold before any work; predict refuses fp8 on a device without
it before its first stage; the daemon fails a file its guard refuses at once (no retry: the
same file is refused again) and records the guard's measurement of a file it accepts.

The daemon runs the real engine (real LMDB store, real guard) with the CPU's eager FP8 path
(``fp8_helpers.cpu_fp8_factory``); the measured guard cosines of this input are in test_fp8:
plain 0.99922, stress 0.99083, so a threshold of 0.995 separates them."""

from __future__ import annotations

import json

import pytest

from conftest import random_proteins, write_fasta
from gpuengine.daemon import Daemon
from gpuengine.errors import UsageError
from gpuengine.workflows.virnucpro.pipeline import PredictConfig
from fp8_helpers import (cli_result, cpu_fp8_factory, fp8_daemon, needs_cpu_fp8,
                         weights)  # noqa: F401  (fixture)


@pytest.fixture
def proteins_text():
    seqs = random_proteins([30 + 7 * i for i in range(40)], seed=5)
    return "".join(f">p{i}\n{s}\n" for i, s in enumerate(seqs))


@pytest.mark.parametrize("command", ["embed", "predict", "serve"])
def test_fp8_min_cosine_is_checked_by_every_front_end_before_any_work(command, tiny_pt,
                                                                      tmp_path):
    fasta = write_fasta(tmp_path / "p.fa", [("a", "MKV")])
    args = {"embed": ["embed", str(fasta), "-m", str(tiny_pt), "-o", str(tmp_path / "s.lmdb")],
            "predict": ["predict", str(fasta), "--length", "300", "--classifier",
                        str(tmp_path / "300_model.pth"), "--out", str(tmp_path / "out")],
            "serve": ["serve", "--watch", str(tmp_path / "w"), "--store",
                      str(tmp_path / "s.lmdb"), "-m", str(tiny_pt)]}[command]
    code, out, err = cli_result(args + ["--gpus", "cpu", "--precision", "fp8",
                                        "--fp8-min-cosine", "1.5"])
    assert code == 2, (code, err)
    assert "--fp8-min-cosine 1.5: a cosine lies in [-1, 1]" in err and "Traceback" not in err
    assert not any((tmp_path / name).exists() for name in ("s.lmdb", "out", "w")), \
        "nothing was created"


def test_predict_config_checks_its_precision_and_threshold():
    config = PredictConfig(reads="r.fa", length=300, classifier="c.pth", precision="fp8")
    assert config.fp8_min_cosine == 0.99, "the default of every front end"
    with pytest.raises(UsageError, match="'fp4' is not one of fp32, fp16, bf16, fp8"):
        PredictConfig(reads="r.fa", length=300, classifier="c.pth", precision="fp4")
    with pytest.raises(UsageError, match="--fp8-min-cosine -2"):
        PredictConfig(reads="r.fa", length=300, classifier="c.pth", fp8_min_cosine=-2)


def test_predict_refuses_fp8_on_the_cpu_before_its_first_stage(tmp_path):
    reads = tmp_path / "reads.fa"
    reads.write_text(">r1\n" + "ATG" + "GCT" * 60 + "\n")
    code, out, err = cli_result(["predict", str(reads), "--length", "300", "--classifier",
                                 str(tmp_path / "300_model.pth"), "--gpus", "cpu",
                                 "--precision", "fp8", "--out", str(tmp_path / "out")])
    assert code == 1 and "not a GPU" in err and "--precision fp16" in err, err
    assert "Traceback" not in err and "predict: validate" not in err
    assert not (tmp_path / "out").exists(), "no stage ran"


# -- the daemon ---------------------------------------------------------------------------------

def _daemon(tmp_path, checkpoint, threshold: float) -> Daemon:
    daemon = fp8_daemon(tmp_path, checkpoint, threshold)
    daemon.identity = {"test": True}
    return daemon


@needs_cpu_fp8
def test_daemon_fails_a_file_the_guard_refuses_at_once(weights, proteins_text,  # noqa: F811
                                                       tmp_path):
    from gpuengine.store.reader import EmbeddingStore

    daemon = _daemon(tmp_path, weights["stress"], 0.995)
    try:
        (daemon.processing / "x.fa").write_text(proteins_text)
        daemon.process("x.fa")
        assert (daemon.failed / "x.fa").exists() and "x.fa" not in daemon.retry_at
        record = json.loads((daemon.failed / "x.fa.error.json").read_text())
        assert record["kind"] == "fidelity" and record["error"] == "FidelityError"
        assert "threshold 0.995" in record["reason"] and "traceback" not in record
        assert daemon.attempts.get("x.fa")["attempts"] == 0
    finally:
        daemon._unlock()
    if (tmp_path / "store.lmdb").exists():  # the daemon's store holds nothing of the file
        with EmbeddingStore(tmp_path / "store.lmdb") as store:
            assert len(store) == 0


@needs_cpu_fp8
def test_daemon_records_the_guard_of_a_file_it_accepts(weights, proteins_text,  # noqa: F811
                                                       tmp_path):
    daemon = _daemon(tmp_path, weights["plain"], 0.995)
    try:
        (daemon.processing / "x.fa").write_text(proteins_text)
        daemon.process("x.fa")
        assert (daemon.done / "x.fa").exists()
        record = json.loads((daemon.done / "x.fa.job.json").read_text())
        assert record["status"] == "complete" and record["counts"]["embedded"] == 40
        fidelity = record["fidelity"]
        assert fidelity["passed"] and fidelity["threshold"] == 0.995
        assert 0.995 <= fidelity["min_cosine"] < 0.99999 and fidelity["sequences"] == 40
        assert record["options"]["fp8_min_cosine"] == 0.995
    finally:
        daemon._unlock()
