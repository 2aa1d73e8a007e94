#!/usr/bin/env bash
# Set up a virtualenv, install gpuengine, and embed the bundled example proteins.
# Uses the published esm2_t6_8M_UR50D from the torch-hub cache when it is there; otherwise
# (no internet, e.g. CI) it writes a RANDOM-weight checkpoint of the same shape and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/_venv.sh
"$VENV/bin/pip" install -q -e .
MODEL=esm2_t6_8M_UR50D
HUB=$("$VENV/bin/python" -c "import torch.hub, os; print(os.path.join(torch.hub.get_dir(), 'checkpoints'))")
if [ -f "$HUB/$MODEL.pt" ]; then
  WEIGHTS="$HUB/$MODEL.pt"
  echo "using the published $MODEL from $HUB"
else
  echo "NOTE: $MODEL is not in $HUB and this run does not download it:"
  echo "      writing a RANDOM-weight checkpoint of the same shape (embeddings are meaningless)."
  "$VENV/bin/python" tools/make_checkpoint.py "$MODEL" --out examples/weights
  WEIGHTS=examples/weights/$MODEL.pt
fi
rm -rf examples/proteins.lmdb
"$VENV/bin/gpuengine" embed examples/proteins.fasta --model "$WEIGHTS" --out examples/proteins.lmdb
"$VENV/bin/gpuengine" info examples/proteins.lmdb
echo "first values of GFP_AEQVI:"
"$VENV/bin/gpuengine" lookup examples/proteins.lmdb GFP_AEQVI | cut -f1-6
