#!/usr/bin/env python3
"""End-to-end `gpuengine predict` on synthetic 150-bp reads with random ESM-2 3B and DNABERT-S
weights of the real shapes and a random MLP saved the original way (a whole pickled module).

    python tools/bench_predict.py --reads 100000 --out results.jsonl

Reports wall time and per-stage seconds (validate, frames, dnabert, esm, score), cold: the
stages include reading the checkpoints, hashing them, building and warming up the replicas.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    from gpuengine.synthetic import (ESM2_SHAPES, random_esm2_state, write_dnabert_s,
                                     write_fair_esm_checkpoint_from_state)
    from gpuengine.workflows.virnucpro.pipeline import PredictConfig, run_predict

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reads", type=int, default=100_000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/gpuengine-bench"))
    add_commit_option(ap)
    ap.add_argument("--tiny", action="store_true", help="smoke test on the CPU with tiny models")
    args = ap.parse_args()
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
    out = work / "predict_out"
    shutil.rmtree(out, ignore_errors=True)  # a cold run: nothing reused from an earlier one
    config = PredictConfig(reads=fasta, length=500, classifier=mlp_path, esm_model=str(esm_pt),
                           dnabert_model=str(dna_dir), out=out,
                           devices="cpu" if args.tiny else "auto")
    start = time.perf_counter()
    summary = run_predict(config)
    wall = time.perf_counter() - start
    log = ResultsLog(args.out, args.commit, __file__, n_gpus=torch.cuda.device_count(),
                     with_torch=False)
    rec = log.append(
        model="virnucpro",
        workload="reads150-" + (f"{args.reads // 10**6}M" if args.reads % 10**6 == 0
                                else f"{args.reads // 1000}k"),
        system="gpuengine-predict", precision="fp16",
        tokens_per_s=summary.embed["esm"]["tokens_per_second"],
        sequences_per_s=args.reads / wall, wall_s=wall, stage_seconds=summary.stage_seconds,
        frames=summary.frames, chunks=summary.chunks, reads=summary.reads,
        note="cold run: includes reading/hashing the checkpoints and warm-up in the "
             "dnabert/esm stages; tokens_per_s is the ESM-2 stage's (model tokens)")
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
