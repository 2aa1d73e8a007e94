#!/usr/bin/env bash
# Runs on the device machine (through the device tool): installs the carried wheels, runs the
# GPU tests (SKIP_TESTS=1 skips them), then the benchmarks whose arguments are given:
# DNABERT_ARGS (tools/bench_dnabert.py), BENCH_ARGS (tools/bench_esm.py), FP8_ARGS
# (tools/bench_fp8.py), PREDICT_ARGS (tools/bench_predict.py), REPLICAS_ARGS
# (tools/bench_replicas.py), SERVE_ARGS (tools/bench_serve.py), STARTUP_ARGS
# (tools/bench_startup.py; ' ' runs its defaults). Results land in
# $OUT/results.jsonl, logs next to it.
#   carry: .whl      command: GPUENGINE_COMMIT=<hash> BENCH_ARGS="..." bash tools/device_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUDA_DEVICE_ORDER=PCI_BUS_ID
export GPUENGINE_COMMIT=${GPUENGINE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -m gpu tests/ -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ -n "${STARTUP_ARGS:-}" ]; then  # first: its children measure cold caches of their own
  python3 tools/bench_startup.py $STARTUP_ARGS --out "$OUT/results.jsonl" 2>&1 | tee "$OUT/bench_startup.log"
fi
if [ -n "${DNABERT_ARGS:-}" ]; then
  python3 tools/bench_dnabert.py $DNABERT_ARGS --out "$OUT/results.jsonl" 2>&1 | tee "$OUT/bench_dnabert.log"
fi
if [ -n "${BENCH_ARGS:-}" ]; then
  python3 tools/bench_esm.py $BENCH_ARGS --out "$OUT/results.jsonl" 2>&1 | tee "$OUT/bench.log"
fi
if [ -n "${FP8_ARGS:-}" ]; then  # e.g. FP8_ARGS=--quick (1 min) or FP8_ARGS=' ' (the full run)
  python3 tools/bench_fp8.py $FP8_ARGS --out "$OUT/results.jsonl" 2>&1 | tee "$OUT/bench_fp8.log"
fi
if [ -n "${PREDICT_ARGS:-}" ]; then
  python3 tools/bench_predict.py $PREDICT_ARGS --out "$OUT/results.jsonl" 2>&1 | tee "$OUT/bench_predict.log"
fi
if [ -n "${REPLICAS_ARGS:-}" ]; then
  python3 tools/bench_replicas.py $REPLICAS_ARGS --out "$OUT/results.jsonl" 2>&1 | tee "$OUT/bench_replicas.log"
fi
if [ -n "${SERVE_ARGS:-}" ]; then
  python3 tools/bench_serve.py $SERVE_ARGS --out "$OUT/results.jsonl" 2>&1 | tee "$OUT/bench_serve.log"
fi
