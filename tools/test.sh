#!/usr/bin/env bash
# Set up a virtualenv with the test dependencies and run the CPU test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# torch first, unless the venv has one: TORCH_SPEC picks the build (default: the CPU wheel
# 2.13.0, small and what CI uses; on a GPU server use e.g. TORCH_SPEC=torch for the CUDA build).
install_torch() {
  "$VENV/bin/python" -c "import torch" 2>/dev/null || "$VENV/bin/pip" install -q "${TORCH_SPEC:-torch==2.13.0}"
}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
install_torch
"$VENV/bin/pip" install -q -e ".[test]"
exec "$VENV/bin/python" -m pytest -q "$@"
