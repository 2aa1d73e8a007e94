# Sourced by quickstart.sh and test.sh: create the virtualenv and make sure it has torch.
#
# VENV         the environment to use (default .venv; created if it has no bin/python). One that
#              can already `import torch` keeps its torch, whatever the build (>= 2.4 needed).
# TORCH_SPEC   pip arguments for torch, used as given from pip's configured index, e.g.
#              TORCH_SPEC=torch (PyPI's CUDA build on Linux) or
#              TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128".
# PIP_INDEX_URL  pip's own variable (or index-url in pip.conf): your index or mirror;
#              torch==2.13.0 (or TORCH_SPEC) is installed from it.
#
# With none of these: torch==2.13.0 from a wheel pip finds without the network (a wheelhouse in
# pip's find-links, as on CI), else the CPU-only build from PyTorch's index. On Linux, PyPI's
# plain `torch` is the CUDA build (several GB of CUDA libraries); the CPU build is far smaller.
VENV=${VENV:-.venv}
TORCH_PIN=torch==2.13.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if TORCH_HAVE=$("$VENV/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null); then
  if ! "$VENV/bin/python" -c "import sys, torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < (2, 4))"; then
    echo "$VENV has torch $TORCH_HAVE; gpuengine needs torch >= 2.4 (upgrade it, or use another VENV)" >&2
    exit 1
  fi
  echo "torch: keeping the torch $TORCH_HAVE already in $VENV"
elif [ -n "${TORCH_SPEC:-}" ] || [ -n "${PIP_INDEX_URL:-}" ] \
    || "$VENV/bin/pip" config list 2>/dev/null | grep -qE '\.index-url='; then
  echo "torch: installing ${TORCH_SPEC:-$TORCH_PIN} from ${PIP_INDEX_URL:-the index pip is configured with}"
  [ -n "${TORCH_SPEC:-}" ] || echo "       (a PyPI mirror serves the CUDA build on Linux, several GB; for the CPU build" \
    "set TORCH_SPEC=\"$TORCH_PIN --index-url $TORCH_CPU_INDEX\")"
  # shellcheck disable=SC2086  # TORCH_SPEC may hold several pip arguments
  "$VENV/bin/pip" install -q ${TORCH_SPEC:-$TORCH_PIN}
elif "$VENV/bin/pip" install -q --no-index --no-deps "$TORCH_PIN" >/dev/null 2>&1; then
  echo "torch: installed $TORCH_PIN from a local wheel (pip's find-links); its dependencies from the index"
  "$VENV/bin/pip" install -q "$TORCH_PIN"
else
  echo "torch: installing $TORCH_PIN, CPU-only build, from $TORCH_CPU_INDEX"
  echo "       (set TORCH_SPEC or PIP_INDEX_URL for another build; see tools/_venv.sh)"
  "$VENV/bin/pip" install -q "$TORCH_PIN" --index-url "$TORCH_CPU_INDEX" || {
    echo "could not install torch from $TORCH_CPU_INDEX; set PIP_INDEX_URL (your mirror) or" \
         "TORCH_SPEC (see tools/_venv.sh), or point VENV at an environment that has torch" >&2
    exit 1
  }
fi
