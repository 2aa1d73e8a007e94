#!/usr/bin/env python3
"""The fixed start-up cost of a run on one GPU, part by part, before and after (issue 17).

    python3 tools/bench_startup.py --out $OUT/results.jsonl            # both models, ~2-3 min
    python3 tools/bench_startup.py --out r.jsonl --parts dnabert       # DNABERT-S only, ~1 min

Each part runs in a child process of its own with empty Triton and inductor caches (a cold
machine: what every fresh device pays), on random weights of the real shapes (written once
per ``--workdir``; the ESM-2 3B checkpoint takes about 30 s):

* ``dnabert-s`` fp16, FlexAttention compiled ``static`` (once per row bucket, before) and
  ``dynamic`` (once, the default after): the import of dynamo and inductor, reading and
  building the model, the warm-up batch (first pass: compiles and autotunes; second: steady),
  the first and second batch of four row buckets the warm-up did not meet (a compile shows as
  the first's excess), and steady tokens/s on 40-token items (kernel speed: must hold).
* ``esm2-3b`` fp8: reading, building and quantizing, the warm-up, then the fidelity guard
  (``guard_run`` on 200,000 50-residue records, sampling timed on its own) with its fp16
  reference ``compiled`` (before) and ``eager`` (after), and both guards' min cosines.

Rows: one per part and variant, ``system`` = ``startup:<model>:<variant>``, times in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import ResultsLog, add_commit_option, require_cuda  # noqa: E402

BUCKET_TOTALS = (300, 1000, 5000, 20000)
"""Rows of the batches after the warm-up: buckets 512, 1024, 8192, 32768 (the warm-up's is
65,536)."""
WARM_TOKENS = 65_536
DEVICE = "cuda"
TEST_PRECISION = "fp8"
"""The precision under test for ESM-2 (a CPU check of this script runs fp16)."""


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed(fn):
    _sync()
    started = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - started


def dnabert_child(path: Path, flex: str) -> dict:
    _, cuda_init_s = _timed(lambda: torch.ones(1, device=DEVICE))
    _, import_s = _timed(lambda: __import__("torch._inductor.compile_fx"))
    from gpuengine.models.attention import PackedLayout
    from gpuengine.models.dnabert_s import FlexAlibiAttention
    from gpuengine.models.registry import family
    from gpuengine.models.sources import resolve
    from gpuengine.runner import Runner
    from gpuengine.store.schema import OutputSpec

    fam = family("dnabert-s")
    weights, read_s = _timed(lambda: fam.read(resolve(str(path), allow_download=False)))
    device = torch.device(DEVICE)

    def build():
        model = fam.build(weights, torch.float16)
        runner = Runner(model, device, "fp16", [OutputSpec(weights.num_layers, "mean")],
                        fam.pooling_rule, compile=True)
        if flex == "static":
            runner.attention = FlexAlibiAttention(compiled=True, dynamic=False)
        return runner

    runner, build_s = _timed(build)
    warm = runner.synthetic_items(WARM_TOKENS)
    # FlexAttention alone on the warm-up's rows: its compilation, apart from the layer kernels'
    lengths = torch.tensor([i.n_tokens for i in warm], device=device)
    layout = PackedLayout.build(lengths, int(lengths.sum()), int(lengths.max()), padded=False)
    heads, dim = weights.attention_heads, weights.embed_dim // weights.attention_heads
    q = torch.randn(layout.positions.numel(), heads, dim, device=device, dtype=torch.float16)
    with torch.inference_mode():
        _, flex_compile_s = _timed(lambda: runner.attention(q, q, q, layout))
    _, warm_first_s = _timed(lambda: runner.embed(warm))
    _, warm_second_s = _timed(lambda: runner.embed(warm))
    firsts, seconds = [], []
    for total in BUCKET_TOTALS:
        items = runner.synthetic_items(total, length=50)
        _, first = _timed(lambda: runner.embed(items))
        _, second = _timed(lambda: runner.embed(items))
        firsts.append(round(first, 3))
        seconds.append(round(second, 3))
    short = runner.synthetic_items(WARM_TOKENS, length=40)
    runner.embed(short)
    _, steady_s = _timed(lambda: [runner.embed(short) for _ in range(20)])
    from torch._dynamo.utils import counters

    return dict(cuda_init_s=cuda_init_s, import_compiler_s=import_s, read_s=read_s, build_s=build_s,
                flex_compile_s=flex_compile_s, dynamo_graphs=counters["stats"]["unique_graphs"],
                warm_up_first_s=warm_first_s, warm_up_second_s=warm_second_s,
                bucket_rows=list(BUCKET_TOTALS), bucket_first_s=firsts, bucket_second_s=seconds,
                bucket_compile_s=round(sum(f - s for f, s in zip(firsts, seconds)), 3),
                steady_tokens_per_s=20 * sum(i.n_tokens for i in short) / steady_s,
                attention=type(runner.attention).__name__,
                flex_dynamic=getattr(runner.attention, "dynamic", None), kernels=runner.kernels)


class _Record:
    __slots__ = ("id", "sequence")

    def __init__(self, id_, sequence):
        self.id, self.sequence = id_, sequence


def esm_child(path: Path, records: int) -> list[dict]:
    from gpuengine.fidelity import guard_run, sample_evenly
    from gpuengine.models.registry import family
    from gpuengine.models.sources import resolve
    from gpuengine.runner import Runner
    from gpuengine.store.schema import OutputSpec

    _, cuda_init_s = _timed(lambda: torch.ones(1, device=DEVICE))
    fam = family("esm2")
    source = resolve(str(path), allow_download=False)
    weights, read_s = _timed(lambda: fam.read(source))
    encode = fam.tokenizer(source).encode
    device = torch.device(DEVICE)
    outputs = [OutputSpec(weights.num_layers, "mean")]

    def runner_of(precision, compile):
        model = fam.build(weights, torch.float16)
        return Runner(model, device, precision, outputs, fam.pooling_rule, compile=compile)

    runner, build_s = _timed(lambda: runner_of(TEST_PRECISION, True))
    warm = runner.synthetic_items(WARM_TOKENS)
    _, warm_first_s = _timed(lambda: runner.embed(warm))
    _, warm_second_s = _timed(lambda: runner.embed(warm))
    residues = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
    rng = np.random.default_rng(0)
    seqs = [residues[rng.integers(0, 20, 50)].tobytes().decode() for _ in range(4096)]

    def iterate():  # records derived on the fly, as predict's frames are
        return (_Record(f"r{i}", seqs[i % len(seqs)]) for i in range(records))

    _, sample_s = _timed(lambda: sample_evenly(iterate(), records, 256))
    common = dict(cuda_init_s=cuda_init_s, read_s=read_s, build_s=build_s, warm_up_first_s=warm_first_s,
                  warm_up_second_s=warm_second_s, guard_records=records, sample_s=sample_s,
                  kernels=runner.kernels)
    rows = []
    for variant, compile in (("reference-compiled", True), ("reference-eager", False)):
        built = {}

        def reference():
            started = time.perf_counter()
            made = runner_of("fp16", compile)
            built["s"] = time.perf_counter() - started
            return made

        report, guard_s = _timed(lambda: guard_run("fp8", runner, reference, iterate(), records,
                                                   encode, threshold=0.0))
        rows.append(dict(common, variant=variant, guard_s=guard_s,
                         guard_reference_build_s=built.get("s"), guard_min_cosine=report.min_cosine,
                         guard_mean_cosine=report.mean_cosine))
        torch.cuda.empty_cache()
    return rows


def prepare(work: Path, parts: list[str]) -> dict[str, Path]:
    from gpuengine.synthetic import (ESM2_SHAPES, random_esm2_state, write_dnabert_s,
                                     write_fair_esm_checkpoint_from_state)

    work.mkdir(parents=True, exist_ok=True)
    paths = {}
    if "dnabert" in parts:
        paths["dnabert"] = work / "DNABERT-S_random"
        if not paths["dnabert"].exists():
            write_dnabert_s(paths["dnabert"], seed=0)
    if "esm" in parts:
        paths["esm"] = work / "esm2_t36_3B_UR50D.pt"
        if not paths["esm"].exists():
            layers, d, heads = ESM2_SHAPES["esm2_t36_3B_UR50D"]
            state = random_esm2_state(layers, d, heads, dtype=torch.float16, device="cuda")
            write_fair_esm_checkpoint_from_state(paths["esm"], {k: v.cpu() for k, v in state.items()},
                                                 layers, d, heads)
            del state
            torch.cuda.empty_cache()
    return paths


def run_child(args: list[str]) -> list[dict]:
    """One part in a fresh process with empty compiler caches; its JSON rows."""
    with tempfile.TemporaryDirectory(prefix="startup-caches-") as caches:
        env = dict(os.environ, TRITON_CACHE_DIR=f"{caches}/triton",
                   TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor")
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--child", *args], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        return [dict(error=f"child {args} exited {done.returncode}", child_wall_s=wall)]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return [dict(row, child_wall_s=wall) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gpuengine-bench"))
    parser.add_argument("--parts", default="dnabert,esm")
    parser.add_argument("--records", type=int, default=200_000,
                        help="records the guard samples from (esm)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    add_commit_option(parser)
    args = parser.parse_args()
    require_cuda(__file__)
    if args.child:
        kind, path, variant = args.child
        rows = ([dnabert_child(Path(path), variant)] if kind == "dnabert"
                else esm_child(Path(path), int(variant)))
        print(json.dumps(rows))
        return
    if args.out is None:
        parser.error("--out is required")
    parts = args.parts.split(",")
    paths = prepare(args.workdir, parts)
    log = ResultsLog(args.out, args.commit, __file__)
    jobs = []
    if "dnabert" in parts:
        jobs += [("dnabert-s", v, ["dnabert", str(paths["dnabert"]), v]) for v in ("static", "dynamic")]
    if "esm" in parts:
        jobs += [("esm2-3b-fp8", None, ["esm", str(paths["esm"]), str(args.records)])]
    for model, variant, child in jobs:
        for row in run_child(child):
            row = dict(row, model=model, variant=row.get("variant", variant))
            row["system"] = f"startup:{model}:{row['variant']}"
            log.append(**row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
