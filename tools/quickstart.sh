#!/usr/bin/env bash
# Set up a virtualenv, install gpuengine, and run it on the bundled examples.
#
#   ./tools/quickstart.sh           embed examples/proteins.fasta with ESM-2 8M, show a lookup
#   ./tools/quickstart.sh predict   VirNucPro `predict` on examples/reads.fasta, end to end
#
# Uses the published esm2_t6_8M_UR50D from the torch-hub cache when it is there (and, for
# predict, zhihan1996/DNABERT-S from the Hugging Face cache); otherwise (no internet, e.g. CI)
# it writes RANDOM-weight checkpoints with tools/make_checkpoint.py and says so. The predict
# classifier is always random: the published 500_model.pth takes ESM-2 3B features (3328 values),
# far too big for a quick start, so a random MLP sized for the small models is written instead.
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-embed}
case "$WHAT" in
  embed|predict) ;;
  *) echo "usage: $0 [embed|predict]" >&2; exit 2 ;;
esac
. tools/_venv.sh
"$VENV/bin/pip" install -q -e .
PY="$VENV/bin/python"
MODEL=esm2_t6_8M_UR50D
HUB=$("$PY" -c "import torch.hub, os; print(os.path.join(torch.hub.get_dir(), 'checkpoints'))")
if [ -f "$HUB/$MODEL.pt" ]; then
  WEIGHTS="$HUB/$MODEL.pt"
  echo "using the published $MODEL from $HUB"
else
  echo "NOTE: $MODEL is not in $HUB and this run does not download it:"
  echo "      writing a RANDOM-weight checkpoint of the same shape (embeddings are meaningless)."
  "$PY" tools/make_checkpoint.py "$MODEL" --out examples/weights
  WEIGHTS=examples/weights/$MODEL.pt
fi

if [ "$WHAT" = embed ]; then
  rm -rf examples/proteins.lmdb
  "$VENV/bin/gpuengine" embed examples/proteins.fasta --model "$WEIGHTS" --out examples/proteins.lmdb
  "$VENV/bin/gpuengine" info examples/proteins.lmdb
  echo "first values of GFP_AEQVI:"
  "$VENV/bin/gpuengine" lookup examples/proteins.lmdb GFP_AEQVI | cut -f1-6
  exit 0
fi

# predict: DNABERT-S from the HF cache, else a small random one (4 layers, d=256)
if DNA=$("$PY" -c "from gpuengine.models.sources import resolve
print(resolve('zhihan1996/DNABERT-S', allow_download=False).path)" 2>/dev/null); then
  echo "using zhihan1996/DNABERT-S from the Hugging Face cache ($DNA)"
else
  DNA=examples/weights/dnabert-s_t4_d256_random
  echo "NOTE: zhihan1996/DNABERT-S is not in the Hugging Face cache: using a small RANDOM-weight"
  echo "      DNABERT-S (4 layers, d=256; the real one has 12 layers, d=768)."
  [ -f "$DNA/config.json" ] || "$PY" tools/make_checkpoint.py dnabert-s --layers 4 --dim 256 --heads 4 --out examples/weights
fi
DNA_DIM=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1] + '/config.json'))['hidden_size'])" "$DNA")
ESM_DIM=320
echo "NOTE: the classifier is a RANDOM MLPClassifier($((DNA_DIM + ESM_DIM)), 512, 2) in the published"
echo "      .pth format (DNABERT-S $DNA_DIM + ESM-2 $ESM_DIM features; the published 500_model.pth"
echo "      takes 768 + 2560 from ESM-2 3B): the virus/others calls below are MEANINGLESS."
"$PY" tools/make_checkpoint.py virnucpro-mlp --input-dim $((DNA_DIM + ESM_DIM)) --length 500 --out examples/weights
rm -rf examples/reads_merged
"$VENV/bin/gpuengine" predict examples/reads.fasta --length 500 \
  --classifier examples/weights/500_model_random.pth --esm-model "$WEIGHTS" --dnabert-model "$DNA"
echo "examples/reads_merged/prediction_results.txt (first rows):"
head -n 6 examples/reads_merged/prediction_results.txt
echo "examples/reads_merged/prediction_results_reads.tsv (first rows):"
head -n 6 examples/reads_merged/prediction_results_reads.tsv
echo "REMINDER: random weights were used; the calls mean nothing."
