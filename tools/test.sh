#!/usr/bin/env bash
# Set up a virtualenv with the test dependencies and run the CPU test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/_venv.sh
"$VENV/bin/pip" install -q -e ".[test]"
exec "$VENV/bin/python" -m pytest -q "$@"
