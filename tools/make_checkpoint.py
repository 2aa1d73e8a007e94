#!/usr/bin/env python3
"""Write random-weight model checkpoints in the official formats.

    python tools/make_checkpoint.py esm2_t33_650M_UR50D --out weights/          # real shape, fair-esm .pt
    python tools/make_checkpoint.py esm2 --layers 2 --dim 64 --heads 4 --out w/ --hf   # any small shape, + HF dir
    python tools/make_checkpoint.py esm2_t36_3B_UR50D --outlier-stress --out w/  # outlier-stress weights
    python tools/make_checkpoint.py dnabert-s --out weights/        # DNABERT-S directory, real shape
    python tools/make_checkpoint.py dnabert-s --layers 2 --dim 64 --heads 4 --out w/   # small DNABERT-S
    python tools/make_checkpoint.py virnucpro-mlp --out weights/    # VirNucPro classifier, 3328 inputs
    python tools/make_checkpoint.py virnucpro-mlp --input-dim 576 --length 300 --out w/  # for small models

The VirNucPro classifier is written as the published 300_model.pth / 500_model.pth are: a whole
pickled ``__main__.MLPClassifier`` module (gpuengine reads it without running pickled code).
Its input size must be the DNABERT-S dimension plus the ESM-2 dimension of the models
``gpuengine predict`` runs with: 768 + 2560 = 3328 for DNABERT-S and ESM-2 3B (the default),
e.g. 256 + 320 = 576 for a small random DNABERT-S (--dim 256) and esm2_t6_8M_UR50D.

``--outlier-stress`` (ESM-2) multiplies the LayerNorm gains of a few fixed channels by 30 in
every layer, as trained models' outlier dimensions (gpuengine.synthetic.outlier_stress): stress
weights for reduced precisions such as FP8. The file name says ``_stress``.

The files are marked as synthetic; gpuengine warns whenever it loads one. Random weights of the
real shapes cost exactly the compute of the published ones, so they serve benchmarks too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gpuengine.synthetic import (
    DNABERT_S_SHAPE,
    ESM2_SHAPES,
    VIRNUCPRO_MLP_INPUT,
    write_dnabert_s,
    write_fair_esm_checkpoint,
    write_hf_esm,
    write_virnucpro_mlp,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", help="a published ESM-2 name (" + ", ".join(ESM2_SHAPES) + "), 'esm2', "
                        "'dnabert-s' (a DNABERT-S directory; the real shape unless --layers/--dim/--heads) "
                        "or 'virnucpro-mlp' (VirNucPro's classifier in the published .pth format)")
    parser.add_argument("--layers", type=int, help="number of layers (with shape 'esm2' or 'dnabert-s')")
    parser.add_argument("--dim", type=int, help="embedding dimension (with shape 'esm2' or 'dnabert-s')")
    parser.add_argument("--heads", type=int, help="attention heads (with shape 'esm2' or 'dnabert-s')")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--hf", action="store_true", help="also write a Hugging Face directory")
    parser.add_argument("--outlier-stress", action="store_true",
                        help="ESM-2: a few LayerNorm gain channels x30 in every layer (stress "
                        "weights for reduced precisions such as fp8)")
    parser.add_argument("--input-dim", type=int, default=VIRNUCPRO_MLP_INPUT,
                        help="virnucpro-mlp: DNABERT-S dim + ESM-2 dim (default %(default)s = 768 + 2560)")
    parser.add_argument("--hidden", type=int, default=512, help="virnucpro-mlp: hidden size (default 512)")
    parser.add_argument("--length", type=int, choices=(300, 500), default=500,
                        help="virnucpro-mlp: the chunk length the name announces (300_ or 500_model)")
    args = parser.parse_args()
    if args.outlier_stress and args.shape in ("dnabert-s", "virnucpro-mlp"):
        parser.error("--outlier-stress is for ESM-2 checkpoints")
    if args.shape == "dnabert-s":
        write_dnabert(args)
        return
    if args.shape == "virnucpro-mlp":
        if args.input_dim < 1 or args.hidden < 1:
            parser.error("--input-dim and --hidden must be positive")
        path = write_virnucpro_mlp(args.out / f"{args.length}_model_random.pth", args.input_dim,
                                   args.hidden, seed=args.seed)
        print(f"wrote {path} (RANDOM weights: VirNucPro MLPClassifier({args.input_dim}, "
              f"{args.hidden}, 2), pickled whole as the published files are)")
        return
    if args.shape in ESM2_SHAPES:
        layers, dim, heads = ESM2_SHAPES[args.shape]
        name = args.shape
    elif args.shape == "esm2" and args.layers and args.dim and args.heads:
        layers, dim, heads = args.layers, args.dim, args.heads
        name = f"esm2_t{layers}_d{dim}_random"
    else:
        parser.error("give a published ESM-2 name, or 'esm2' with --layers, --dim and --heads")
    dtype = getattr(torch, args.dtype)
    stress = args.outlier_stress
    name += "_stress" if stress else ""
    pt = write_fair_esm_checkpoint(args.out / f"{name}.pt", layers, dim, heads, seed=args.seed,
                                   dtype=dtype, stress=stress)
    print(f"wrote {pt} (RANDOM weights: {layers} layers, d={dim}, {heads} heads"
          + (", LayerNorm outlier channels x30" if stress else "") + ")")
    if args.hf:
        hf = write_hf_esm(args.out / f"{name}_hf", layers, dim, heads, seed=args.seed, dtype=dtype,
                          stress=stress)
        print(f"wrote {hf}/ (Hugging Face format, same RANDOM weights)")


def write_dnabert(args: argparse.Namespace) -> None:
    layers, dim, heads, inner, vocab = DNABERT_S_SHAPE
    layers, dim, heads = args.layers or layers, args.dim or dim, args.heads or heads
    if args.dim:
        inner = 4 * dim
    name = "DNABERT-S_random" if (layers, dim, heads) == DNABERT_S_SHAPE[:3] else f"dnabert-s_t{layers}_d{dim}_random"
    out = write_dnabert_s(args.out / name, layers, dim, heads, inner, vocab, seed=args.seed,
                          dtype=getattr(torch, args.dtype))
    print(f"wrote {out}/ (RANDOM weights, DNABERT-S layout: {layers} layers, d={dim}, {heads} heads, "
          f"GLU {inner}, vocabulary {vocab}; trained BPE tokenizer.json)")


if __name__ == "__main__":
    main()
