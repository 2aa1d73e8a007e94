# Sourced by quickstart.sh and test.sh: create the virtualenv and install torch into it.
# TORCH_SPEC picks the build (default: the CPU wheel 2.13.0, small and what CI uses; on a GPU
# server use e.g. TORCH_SPEC=torch for the CUDA build). A venv that has torch keeps it.
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q "${TORCH_SPEC:-torch==2.13.0}"
