"""`gpuengine predict` end to end on the CPU with tiny random ESM-2 and DNABERT-S checkpoints and
a random MLP saved the original way (a whole pickled module), against a plain reference
pipeline written here: the per-read reference translation, fair-esm's own forward, the plain
padded DNABERT-S reading (dnabert_s_reference.py), and the original MLP loaded the original way
(virnucpro_files.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import fair_esm_reference
from dnabert_s_reference import reference_embeddings
from embed_processes import committed_in_another_process
from gpuengine.cli import app
from gpuengine.workflows.virnucpro.frames import chunk_sequence, translate_frames_reference
from held_process import held_command, held_env
from virnucpro_files import (load_the_original_way, random_original, read_predictions,
                             reads_fasta, save_original_way)

TOL = 1e-5


@pytest.fixture
def models(predict_models):
    """(esm, dna, mlp, mlp_path): the tiny predict models (read-only)."""
    return predict_models


def reference_predictions(reads, esm, dna, mlp, length=500):
    frames = []
    for rid, seq in reads:
        for chunk_id, chunk in chunk_sequence(rid, seq, length):
            frames.extend(translate_frames_reference(chunk_id, chunk))
    ids = [f.frame_id for f in frames]
    dna_mean = np.stack(reference_embeddings(dna, [f.nucleotide for f in frames], [2],
                                             batched=False)[2]["mean"])
    esm_mean = fair_esm_reference(esm, [f.protein for f in frames], [2])[2]["mean"]
    features = torch.from_numpy(np.concatenate([dna_mean, esm_mean], axis=1)).float()
    with torch.no_grad():
        probs = F.softmax(mlp.eval()(features), dim=1).numpy()
    return ids, probs


def run(args):
    result = CliRunner().invoke(app, ["predict", *args, "--gpus", "cpu", "--offline", "-q", "--json"])
    assert result.exit_code == 0, result.output
    return result


def test_predict_matches_the_reference_pipeline(tmp_path, models):
    esm, dna, mlp, mlp_path = models
    reads = reads_fasta(tmp_path / "reads.fasta")
    run([str(tmp_path / "reads.fasta"), "--length", "500", "--classifier", str(mlp_path),
         "--esm-model", str(esm), "--dnabert-model", str(dna), "--keep-intermediate"])
    out = tmp_path / "reads_merged"
    ids, labels, scores = read_predictions(out / "prediction_results.txt")
    ref_ids, ref_probs = reference_predictions(reads, esm, dna, mlp)
    assert ids == ref_ids
    assert np.abs(scores - ref_probs).max() <= TOL
    assert labels == ["virus" if p[1] > p[0] else "others" for p in ref_probs]
    consensus = (out / "prediction_results_highestscore.csv").read_text().splitlines()
    assert consensus[0] == "Modified_ID\tIs_Virus"
    chunks = {}
    for fid, p in zip(ref_ids, ref_probs):
        best = chunks.setdefault(fid[:-2], [0.0, 0.0])
        best[0], best[1] = max(best[0], p[0]), max(best[1], p[1])
    assert consensus[1:] == [f"{c}\t{chunks[c][1] >= chunks[c][0]}" for c in sorted(chunks)]
    assert (out / "reads_identified_protein.faa").read_text().count(">") == len(ref_ids)
    assert (out / "prediction_results_reads.tsv").exists()


def test_rerun_with_another_classifier_recomputes_nothing(tmp_path, models):
    esm, dna, mlp, mlp_path = models
    reads_fasta(tmp_path / "reads.fasta", n=12)
    base = [str(tmp_path / "reads.fasta"), "--length", "500", "--esm-model", str(esm),
            "--dnabert-model", str(dna)]
    import json

    first = json.loads(run(base + ["--classifier", str(mlp_path)]).stdout)
    other = random_original(input_dim=48 + 64, hidden=32, seed=9)
    other_path = tmp_path / "other_500_model.pth"
    save_original_way(other, other_path)
    second = json.loads(run(base + ["--classifier", str(other_path)]).stdout)
    assert first["embed"]["esm"]["embedded"] > 0
    for name in ("dnabert", "esm"):
        assert second["embed"][name]["embedded"] == 0
        assert second["embed"][name]["already_stored"] == first["frames"]


def test_positional_form_and_classifier_size_check(tmp_path, models):
    esm, dna, _, _ = models
    reads_fasta(tmp_path / "reads.fasta", n=5)
    wrong = random_original(input_dim=3328, hidden=16, seed=1)
    wrong_path = tmp_path / "500_model.pth"
    save_original_way(wrong, wrong_path)
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "reads.fasta"), "500",
                                      str(wrong_path), "--esm-model", str(esm), "--dnabert-model",
                                      str(dna), "--gpus", "cpu", "-q"])
    assert result.exit_code == 1
    assert "3328" in result.output and "112" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("input_process", ["0", "1"], ids=["thread", "input-processes"])
def test_predict_killed_with_sigkill_resumes_to_the_same_outputs(tmp_path, models,
                                                                 input_process):
    """A real `gpuengine predict` process killed with SIGKILL while embedding; the rerun
    finishes from the store and writes exactly the outputs of an uninterrupted run (frames
    made in the planner thread, or in input processes that a SIGKILL leaves orphaned)."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    esm, dna, _, mlp_path = models
    reads_fasta(tmp_path / "reads.fasta", n=1500, seed=11)
    args = [str(tmp_path / "reads.fasta"), "--length", "500", "--classifier", str(mlp_path),
            "--esm-model", str(esm), "--dnabert-model", str(dna), "--gpus", "cpu", "--offline",
            "-q", "--max-tokens", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPUENGINE_OFFLINE": "1",
           "GPUENGINE_INPUT_PROCESS": input_process}
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "gpuengine", "predict", *args, "--out", str(reference)],
                   check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    # held (held_process.py): no batch after the first ones until the kill, so the run is
    # still embedding when the kill comes however busy the machine is
    child = subprocess.Popen(held_command("predict", *args, "--out", str(out)),
                             env=held_env(env), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if committed_in_another_process(out / "embeddings.lmdb", "dnabert") > 0:  # groups are in
            break
        time.sleep(0.05)
    assert child.poll() is None, "the run ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    rerun = subprocess.run([sys.executable, "-m", "gpuengine", "predict", *args, "--out", str(out),
                            "--json"], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    stored = sum(summary["embed"][n]["already_stored"] for n in ("dnabert", "esm"))
    assert stored > 0
    for name in ("prediction_results.txt", "prediction_results_highestscore.csv",
                 "prediction_results_reads.tsv"):
        ours = (out / name).read_text().splitlines()
        ref = (reference / name).read_text().splitlines()
        assert ours[0] == ref[0] and len(ours) == len(ref)
        if name == "prediction_results.txt":  # scores equal within float rounding
            a = np.array([[float(x) for x in r.split("\t")[2:]] for r in ours[1:]])
            b = np.array([[float(x) for x in r.split("\t")[2:]] for r in ref[1:]])
            assert [r.split("\t")[:2] for r in ours[1:]] == [r.split("\t")[:2] for r in ref[1:]]
            assert np.abs(a - b).max() <= 1e-6
        else:
            assert ours == ref


@pytest.mark.slow
def test_make_checkpoint_mlp_runs_predict_on_the_bundled_reads(tmp_path, models):
    """tools/make_checkpoint.py virnucpro-mlp writes the published .pth format (the original
    tool loads it), gpuengine reads it without unpickling code, and predict runs end to end on
    examples/reads.fasta with it (what `./tools/quickstart.sh predict` does), matching the
    reference pipeline scored with the file as the original loads it."""
    import subprocess
    import sys
    from pathlib import Path

    from Bio import SeqIO

    esm, dna, _, _ = models
    root = Path(__file__).resolve().parents[1]
    made = subprocess.run([sys.executable, str(root / "tools" / "make_checkpoint.py"),
                           "virnucpro-mlp", "--input-dim", str(48 + 64), "--hidden", "32",
                           "--out", str(tmp_path / "w"), "--seed", "4"],
                          capture_output=True, text=True, cwd=root)
    assert made.returncode == 0, made.stderr
    mlp_path = tmp_path / "w" / "500_model_random.pth"
    assert "RANDOM" in made.stdout and mlp_path.is_file()
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(mlp_path)) == {
        "__main__.MLPClassifier", "torch.nn.modules.linear.Linear",
        "torch.nn.modules.batchnorm.BatchNorm1d", "torch.nn.modules.dropout.Dropout"}
    original = load_the_original_way(mlp_path)
    reads_path = root / "examples" / "reads.fasta"
    reads = [(r.id, str(r.seq)) for r in SeqIO.parse(reads_path, "fasta")]
    assert len(reads) >= 20 and all(300 <= len(s) <= 500 for _, s in reads)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["predict", str(reads_path), "--length", "500",
                                      "--classifier", str(mlp_path), "--esm-model", str(esm),
                                      "--dnabert-model", str(dna), "--out", str(out),
                                      "--gpus", "cpu", "--offline", "--json"])
    assert result.exit_code == 0, result.output
    assert "RANDOM weights" in result.output  # the classifier warns, as the models do
    ids, labels, scores = read_predictions(out / "prediction_results.txt")
    ref_ids, ref_probs = reference_predictions(reads, esm, dna, original)
    assert ids == ref_ids
    assert {i.split("_chunk_")[0] for i in ids} == {rid for rid, _ in reads}  # every read scored
    assert np.abs(scores - ref_probs).max() <= TOL
    assert labels == ["virus" if p[1] > p[0] else "others" for p in ref_probs]
