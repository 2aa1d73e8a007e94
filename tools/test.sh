#!/usr/bin/env bash
# Set up a virtualenv with the test dependencies and run the CPU test suite (what CI runs).
# GPUENGINE_TEST_INSTALL_ONLY=1: set up only; GPUENGINE_TEST_SKIP_INSTALL=1: run only (.ci/run
# sets up while SLURM starts, then runs).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${GPUENGINE_TEST_SKIP_INSTALL:-0}" = 1 ]; then
  VENV=${VENV:-.venv}
else
  . tools/_venv.sh
  "$VENV/bin/pip" install -q -e ".[test]"
fi
[ "${GPUENGINE_TEST_INSTALL_ONLY:-0}" = 1 ] && exit 0
exec "$VENV/bin/python" -m pytest -q "$@"
