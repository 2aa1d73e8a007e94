"""``gpuengine check`` on the CPU with tiny random models: real fp32/bf16/fp8 numbers from the
engine's own runners, a broken precision caught, classifiers (direct and VirNucPro), the CLI's
exit codes and output."""

from __future__ import annotations

import json
import random

import pytest

from conftest import random_proteins, write_fasta
from gpuengine.check import CheckConfig, format_report, run_check
from gpuengine.errors import UsageError
from gpuengine.fidelity import sample_evenly, sample_indices
from gpuengine.models import fp8
from fp8_helpers import cli_result, needs_cpu_fp8


@pytest.fixture(scope="module")
def proteins(tmp_path_factory):
    seqs = random_proteins([20 + 9 * i for i in range(30)], seed=7)
    return write_fasta(tmp_path_factory.mktemp("check") / "p.fa",
                       [(f"p{i}", s) for i, s in enumerate(seqs)])


def config(model, inputs, **kw):
    return CheckConfig(inputs=(inputs,), model=str(model), devices="cpu", **kw)


def test_sample_is_spread_evenly_and_deterministic():
    assert sample_indices(10, 4) == [0, 3, 6, 9]
    assert sample_indices(3, 10) == [0, 1, 2]
    assert sample_indices(0, 5) == [] and sample_indices(5, 0) == []
    assert sample_evenly(iter("abcdefghij"), 10, 4) == ["a", "d", "g", "j"]


@needs_cpu_fp8
def test_check_reports_each_precision(tiny_pt, proteins):
    report = run_check(config(tiny_pt, proteins, precisions=("bf16", "fp8"), sample=12))
    assert report.sequences == 12 and report.layer == 2 and report.device == "cpu"
    assert report.reference_tokens_per_second > 0
    bf16, f8 = report.results
    assert (bf16.precision, bf16.kernels, f8.precision, f8.kernels) == \
        ("bf16", "eager", "fp8", "fp8-eager")
    # measured: bf16 0.99999, fp8 0.99925 (default GEMMs; 0.9990 with all four in FP8)
    assert 0.9999 <= bf16.min_cosine < 1.0 and 0.998 <= f8.min_cosine < 0.9999
    assert f8.min_cosine <= f8.mean_cosine and 0 < bf16.max_abs_error < f8.max_abs_error
    assert f8.worst_record in {f"p{i}" for i in range(30)} and f8.tokens_per_second > 0
    assert report.failed == []
    text = format_report(report)
    assert "fp8-eager" in text and "lowest cosine: fp8" in text


@needs_cpu_fp8
def test_check_catches_a_broken_precision(tiny_pt, proteins, monkeypatch):
    """A wrong activation scale (each token's given to the next) in the fp8 path: check sees it
    and fails the threshold a correct fp8 passes."""
    quantize = fp8.quantize_rows

    def shifted(x):
        q, s = quantize(x)
        return q, s.roll(1, 0) if x.shape[0] > 256 else s  # activations, not the weights

    monkeypatch.setattr(fp8, "quantize_rows", shifted)
    report = run_check(config(tiny_pt, proteins, precisions=("fp8",), sample=12,
                              min_cosine=0.99))
    assert report.results[0].min_cosine < 0.99 and report.failed == ["fp8"]
    assert "FAILED: fp8 below --min-cosine 0.99" in format_report(report)


def test_check_with_a_classifier_on_the_model_embeddings(tiny_pt, proteins, tmp_path):
    from virnucpro_files import random_original, save_original_way

    save_original_way(random_original(input_dim=64, hidden=16, seed=4), tmp_path / "mlp.pth")
    report = run_check(config(tiny_pt, proteins, precisions=("bf16",), sample=30,
                              classifier=tmp_path / "mlp.pth"))
    assert report.classifier_mode == "direct"
    assert sum(report.reference_labels.values()) == 30
    result = report.results[0]
    assert result.label_agreement == 1 - result.labels_changed / 30


def test_check_virnucpro_reads(tiny_pt, tmp_path):
    """Reads → chunks → frames as predict makes them; ESM-2 checked at bf16, DNABERT-S (the
    partner) at fp32 once; the labels of the MLP on [DNABERT-S | ESM-2] compared."""
    from gpuengine.synthetic import write_dnabert_s
    from virnucpro_files import random_original, save_original_way

    dna = write_dnabert_s(tmp_path / "dna", num_layers=2, embed_dim=48, heads=4, intermediate=96,
                          vocab=64, seed=2)
    save_original_way(random_original(input_dim=48 + 64, hidden=32, seed=3),
                      tmp_path / "500_model.pth")
    rng = random.Random(3)
    codons = [a + b + c for a in "ACGT" for b in "ACGT" for c in "ACGT"
              if a + b + c not in ("TAA", "TAG", "TGA")]  # frame 1 has no stop: it is kept
    reads = write_fasta(tmp_path / "reads.fa",
                        [(f"r{i}", "".join(rng.choice(codons) for _ in range(167))[:500])
                         for i in range(24)])
    report = run_check(config(tiny_pt, reads, precisions=("bf16",), sample=20,
                              classifier=tmp_path / "500_model.pth", partner_model=str(dna)))
    assert report.classifier_mode == "virnucpro" and report.sequences == 20
    assert sum(report.reference_labels.values()) == 20
    assert report.results[0].label_agreement is not None
    assert "_chunk_" in report.results[0].worst_record  # a frame id
    with pytest.raises(UsageError, match="--length"):
        save_original_way(random_original(input_dim=48 + 64, hidden=32, seed=3),
                          tmp_path / "model.pth")
        run_check(config(tiny_pt, reads, precisions=("bf16",), sample=4,
                         classifier=tmp_path / "model.pth", partner_model=str(dna)))


def test_check_config_refuses_bad_values(tiny_pt, proteins):
    with pytest.raises(UsageError, match="fp32"):
        config(tiny_pt, proteins, precisions=("fp32",))
    with pytest.raises(UsageError, match="--sample"):
        config(tiny_pt, proteins, sample=0)


def test_check_cli(tiny_pt, proteins, tmp_path):
    args = ["check", str(proteins), "-m", str(tiny_pt), "--gpus", "cpu", "--sample", "8",
            "--precision", "bf16"]
    code, out, err = cli_result(args + ["--min-cosine", "0.999999999"])
    assert code == 1 and "FAILED: bf16 below --min-cosine" in out, (out, err)
    assert "Traceback" not in err and "check: fp32 reference on cpu" in err
    code, out, err = cli_result(args + ["--min-cosine", "0.99", "--json", "-q"])
    assert code == 0, err
    data = json.loads(out)
    assert data["failed"] == [] and data["results"][0]["precision"] == "bf16"
    assert data["sequences"] == 8 and 0.9999 <= data["results"][0]["min_cosine"] < 1
    code, out, err = cli_result(["check", str(proteins), "-m", str(tiny_pt), "--gpus", "cpu",
                                 "--precision", "fp4"])
    assert code == 2 and "fp4" in err and "Traceback" not in err
    code, out, err = cli_result(["embed", str(proteins), "-m", str(tiny_pt), "-o",
                                 str(tmp_path / "s.lmdb"), "--gpus", "cpu", "--precision", "fp8"])
    assert code == 1 and "compute capability 8.9" in err and "Traceback" not in err, err
