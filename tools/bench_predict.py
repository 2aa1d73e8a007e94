#!/usr/bin/env python3
"""End-to-end `gpuengine predict` on synthetic 150-bp reads with random ESM-2 3B and DNABERT-S
weights of the real shapes and a random MLP saved the original way (a whole pickled module).

    python tools/bench_predict.py --reads 100000 --out results.jsonl
    python tools/bench_predict.py --reads 1000000 --precision fp8 --out results.jsonl
    python tools/bench_predict.py --tiny --noop --reads 100000 --agreement-reads 0 --out x.jsonl

Reports wall time and per-stage seconds (validate, frames, dnabert, esm, score), cold: the
stages include reading the checkpoints, hashing them, building and warming up the replicas.

``--precision fp8`` runs the ESM-2 stage in FP8 (its fidelity guard included, its measurement
in the record's ``fidelity``), then the first ``--agreement-reads`` reads (default 200 000) once
more at fp16, in the same process (the DNABERT-S replica is reused, an fp16 ESM-2 replica is
built), into a store and outputs of their own, and compares the two runs' outputs on those
reads: frame labels (``prediction_results.txt``), chunk calls
(``prediction_results_highestscore.csv``) and the largest score difference. The record's
``label_agreement`` is the share of those frames whose label fp8 left unchanged; ``agreement``
holds the details and the fp16 subset's own wall and stage seconds (``reference_*``), not part of
``wall_s`` (the fp8 run's, cold). With random weights the classifier's labels mean nothing
biologically; their agreement still shows how often FP8 moves a decision.

Time on one H200 (one device call): 1 M reads at fp8 plus the fp16 subset of 200 k take about
7–8 minutes (fp16 predict of 1 M reads: 423 s; its ESM-2 stage 315 s, which fp8 shortens by
about a third; an fp16 subset of 200 k reads: about 100 s with DNABERT-S already loaded; the
3B checkpoint is written once per ``--workdir``, about 30 s). An fp16 run of all 1 M reads as
the reference would add about 7 minutes more: hence the subset.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import ResultsLog, add_commit_option, write_reads_fasta  # noqa: E402


class MLPClassifier(nn.Module):
    """VirNucPro's classifier, defined in ``__main__`` as in its training script."""

    def __init__(self, input_dim, hidden_dim, num_class):
        super().__init__()
        self.hidden_layer = nn.Linear(input_dim, hidden_dim)
        self.bn1 = nn.BatchNorm1d(hidden_dim)
        self.output_layer = nn.Linear(hidden_dim, num_class)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.output_layer(self.dropout(torch.relu(self.bn1(self.hidden_layer(x)))))


def prepare(args) -> tuple[Path, Path, Path, Path]:
    """The checkpoints (written once per workdir), the classifier and the reads FASTA."""
    from gpuengine.synthetic import (ESM2_SHAPES, random_esm2_state, write_dnabert_s,
                                     write_fair_esm_checkpoint_from_state)

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    esm_pt = work / ("esm2_t2_tiny.pt" if args.tiny else "esm2_t36_3B_UR50D.pt")
    if not esm_pt.exists():
        layers, d, heads = (2, 2560, 40) if args.tiny else ESM2_SHAPES["esm2_t36_3B_UR50D"]
        state = random_esm2_state(layers, d, heads, dtype=torch.float16,
                                  device="cpu" if args.tiny else "cuda")
        write_fair_esm_checkpoint_from_state(esm_pt, {k: v.cpu() for k, v in state.items()},
                                             layers, d, heads)
        del state
    dna_dir = work / ("DNABERT-S_tiny" if args.tiny else "DNABERT-S_random")
    if not dna_dir.exists():
        write_dnabert_s(dna_dir, seed=0, **({"num_layers": 1} if args.tiny else {}))
    mlp_path = work / "500_model.pth"
    torch.manual_seed(0)
    torch.save(MLPClassifier(3328, 512, 2).eval(), mlp_path)  # the original way
    rng = np.random.default_rng(1)
    bases = np.frombuffer(b"ACGTN", dtype=np.uint8)
    fasta = write_reads_fasta(work / f"reads150_{args.reads}.fa", args.reads,
                              lambda n: bases[rng.choice(5, (n, 150), p=[0.2495] * 4 + [0.002])])
    return esm_pt, dna_dir, mlp_path, fasta


def first_reads(fasta: Path, n: int, path: Path) -> Path:
    """The first ``n`` records of ``fasta`` (two lines each, as write_reads_fasta writes)."""
    with open(fasta) as src, open(path, "w") as dst:
        for i, line in enumerate(src):
            if i >= 2 * n:
                break
            dst.write(line)
    return path


def read_outputs(out: Path) -> tuple[dict[str, tuple[str, float]], dict[str, str]]:
    """Frame id → (label, virus score) and chunk id → call, from a predict output folder."""
    from gpuengine.workflows.virnucpro.outputs import CONSENSUS_FILE, PREDICTIONS_FILE

    frames = {}
    with open(out / PREDICTIONS_FILE, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            frames[row["Sequence_ID"]] = (row["Prediction"], float(row["score2"]))
    with open(out / CONSENSUS_FILE, newline="") as f:
        chunks = {row["Modified_ID"]: row["Is_Virus"] for row in csv.DictReader(f, delimiter="\t")}
    return frames, chunks


def agreement(test: Path, reference: Path) -> dict:
    """How the outputs in ``test`` compare with ``reference`` on the frames and chunks of the
    reference (a subset of the test run's reads)."""
    frames, chunks = read_outputs(test)
    ref_frames, ref_chunks = read_outputs(reference)
    missing = [f for f in ref_frames if f not in frames]
    if missing or any(c not in chunks for c in ref_chunks):
        raise SystemExit(f"bench_predict: {len(missing)} frames of the fp16 subset are not in "
                         "the test run's outputs")
    same = [frames[f][0] == label for f, (label, _) in ref_frames.items()]
    diff = [abs(frames[f][1] - score) for f, (_, score) in ref_frames.items()]
    calls = [chunks[c] == call for c, call in ref_chunks.items()]
    return {"frames": len(same), "frame_label_agreement": float(np.mean(same)),
            "frames_changed": len(same) - int(np.sum(same)),
            "chunks": len(calls), "chunk_call_agreement": float(np.mean(calls)),
            "chunks_changed": len(calls) - int(np.sum(calls)),
            "max_abs_virus_score_diff": float(np.max(diff)),
            "mean_abs_virus_score_diff": float(np.mean(diff)),
            "reference_virus_frames": sum(label == "virus" for label, _ in ref_frames.values())}


def fp16_subset(args, fasta: Path, mlp_path: Path, esm_pt: Path, dna_dir: Path, devices: str,
                pool, out: Path) -> dict:
    """The first ``--agreement-reads`` reads again at fp16 (``--tiny``: the CPU's fp32) in
    this process, and how the precision run's outputs agree with it on those reads."""
    from gpuengine.workflows.virnucpro.pipeline import PredictConfig, run_predict

    n = min(args.agreement_reads, args.reads)
    subset = args.workdir / "fp16_subset"
    subset.mkdir()
    reference = PredictConfig(reads=first_reads(fasta, n, subset / "reads.fa"), length=500,
                              classifier=mlp_path, esm_model=str(esm_pt),
                              dnabert_model=str(dna_dir), out=subset / "out",
                              devices=devices, precision=None)
    started = time.perf_counter()
    ref = run_predict(reference, replicas=pool)
    wall = time.perf_counter() - started
    what = "fp32" if args.tiny else "fp16"
    found = agreement(out, subset / "out")
    return {"label_agreement": found["frame_label_agreement"],
            "agreement": {"reads": n, "subset": f"the first {n} of {args.reads} reads",
                          "reference": what, "reference_wall_s": wall,
                          "reference_stage_seconds": ref.stage_seconds,
                          "reference_esm_tokens_per_s": ref.embed["esm"]["tokens_per_second"],
                          **found},
            "_note": f"; label_agreement: frame labels of the first {n} reads against an "
                     f"{what} run of those reads in the same process (DNABERT-S reused; not "
                     f"in wall_s), a subset to keep one device call under 9 minutes"}


def score_check(config, out: Path, work: Path) -> dict:
    """Score the run's store again in this process (``score_workers=0``, the score stage as it
    was before worker processes) and compare the output bytes with the run's."""
    import dataclasses
    import hashlib

    from gpuengine.workflows.virnucpro.outputs import (CONSENSUS_FILE, PREDICTIONS_FILE,
                                                       READ_SUMMARY_FILE)
    from gpuengine.workflows.virnucpro.pipeline import run_predict

    inline = work / "score_inline"
    shutil.rmtree(inline, ignore_errors=True)
    again = run_predict(dataclasses.replace(config, out=inline, store=config.store_path,
                                            score_only=True, score_workers=0))

    def digest(folder: Path, name: str) -> str:
        return hashlib.sha256((folder / name).read_bytes()).hexdigest()

    names = (PREDICTIONS_FILE, CONSENSUS_FILE, READ_SUMMARY_FILE)
    same = {name: digest(out, name) == digest(inline, name) for name in names}
    shutil.rmtree(inline, ignore_errors=True)
    return {"in_process_score_s": again.stage_seconds["score"], "identical": all(same.values()),
            "files": same}


def noop_devices() -> None:
    """Every ``run_embed`` of this process runs no-op devices of the model's width (the
    tables are 768 and 2560 wide, as the real models')."""
    from gpuengine import engine
    from bench_common import NoopRunner

    real = engine.run_embed

    def run_embed(config, *args, **kwargs):
        width = 768 if config.table == "dnabert" else 2560
        return real(config, *args, runner_factory=NoopRunner.factory(width), **kwargs)

    engine.run_embed = run_embed


def main() -> None:
    from gpuengine.replicas import ReplicaPool
    from gpuengine.workflows.virnucpro.pipeline import PredictConfig, run_predict

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reads", type=int, default=100_000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpuengine-bench"))
    ap.add_argument("--precision", choices=("fp16", "bf16", "fp8"), default="fp16",
                    help="of the ESM-2 stage (fp8: DNABERT-S stays fp16); default fp16")
    ap.add_argument("--agreement-reads", type=int, default=200_000,
                    help="with a precision other than fp16: reads run again at fp16 (--tiny: "
                    "the CPU's fp32) to compare the outputs (0: none); default %(default)s")
    ap.add_argument("--score-check", action="store_true",
                    help="after the run, score its store again in this process (no score "
                    "workers) and compare the output bytes (not in wall_s)")
    add_commit_option(ap)
    ap.add_argument("--tiny", action="store_true", help="smoke test on the CPU with tiny models")
    ap.add_argument("--noop", action="store_true",
                    help="with --tiny: each model's forward replaced by a no-op of its width "
                    "(768, 2560): times predict's host side (frames, input processes, "
                    "planning, commits, scoring and outputs) at the real feature sizes")
    args = ap.parse_args()
    if args.noop and not args.tiny:
        ap.error("--noop runs on the CPU: give --tiny too")
    if args.noop:
        noop_devices()
    esm_pt, dna_dir, mlp_path, fasta = prepare(args)
    work = args.workdir
    out = work / "predict_out"
    shutil.rmtree(out, ignore_errors=True)  # a cold run: nothing reused from an earlier one
    shutil.rmtree(work / "fp16_subset", ignore_errors=True)
    devices = "cpu" if args.tiny else "auto"
    config = PredictConfig(reads=fasta, length=500, classifier=mlp_path, esm_model=str(esm_pt),
                           dnabert_model=str(dna_dir), out=out, devices=devices,
                           precision=None if args.precision == "fp16" else args.precision)
    pool = ReplicaPool()  # empty: the run is cold; the fp16 subset reuses its DNABERT-S
    start = time.perf_counter()
    summary = run_predict(config, replicas=pool)
    wall = time.perf_counter() - start
    extra = {}
    if args.precision != "fp16":
        extra["fidelity"] = summary.embed["esm"].get("fidelity")
    extra["stage_setup_seconds"] = {  # load, hash, build, warm-up (and guard) of each model
        name: embed["wall_seconds"] - embed["embed_seconds"] for name, embed in summary.embed.items()}
    extra["score_workers"] = summary.score_workers
    extra["preload_seconds"] = summary.preload_seconds  # alongside earlier stages, not in wall_s
    extra["preload_wait_seconds"] = summary.preload_wait_seconds  # inside the stage's seconds
    if args.score_check:
        extra["score_check"] = score_check(config, out, work)
    if args.precision != "fp16" and args.agreement_reads > 0:
        extra.update(fp16_subset(args, fasta, mlp_path, esm_pt, dna_dir, devices, pool, out))
    note = extra.pop("_note", "")
    log = ResultsLog(args.out, args.commit, __file__, n_gpus=torch.cuda.device_count(),
                     with_torch=False)
    rec = log.append(
        model="virnucpro",
        workload="reads150-" + (f"{args.reads // 10**6}M" if args.reads % 10**6 == 0
                                else f"{args.reads // 1000}k"),
        system="gpuengine-predict-noop" if args.noop else "gpuengine-predict",
        precision=args.precision,
        tokens_per_s=summary.embed["esm"]["tokens_per_second"],
        sequences_per_s=args.reads / wall, wall_s=wall, stage_seconds=summary.stage_seconds,
        frames=summary.frames, chunks=summary.chunks, reads=summary.reads, **extra,
        note="cold run: includes reading/hashing the checkpoints and warm-up in the "
             "dnabert/esm stages (and, at fp8, the ESM-2 stage's fidelity guard); tokens_per_s "
             "is the ESM-2 stage's (model tokens)" + note
             + "; stage_setup_seconds: each embedding stage's time before its first batch "
             "(reading, hashing, building, warming up the model; at fp8 the guard); "
             "preload_seconds: reading/hashing/building each model ahead, in a thread "
             "alongside the earlier stages (ESM-2's during DNABERT-S; not part of wall_s), "
             "preload_wait_seconds: the part of each stage spent waiting for it"
             + ("; --noop: every forward a no-op of the model's width on the CPU (predict's "
                "host side only)" if args.noop else ""))
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
