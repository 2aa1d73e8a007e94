#!/usr/bin/env bash
# The host pipeline (tools/bench_esm.py --systems host: FASTA → validate → plan → schedule →
# no-op device → LMDB commit) under variations, then sampled by py-spy, all threads and only the
# thread holding the interpreter lock. Runs here or on the device machine (after
# tools/device_check.sh's wheel install, with SKIP_TESTS=1). Results append to
# $OUT/results.jsonl; the py-spy profiles land in $OUT as collapsed stacks, with a summary
# (tools/pyspy_summary.py).
#   HOST_ARGS   extra bench_esm.py arguments (default: 650M dims, virnucpro150, 400k sequences)
#   VARIANTS    which runs, default "base si0.5 si0.1 shm noinput spy spygil"
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
HOST_ARGS=${HOST_ARGS:---models 650M --workloads virnucpro150 --host-sequences 400000}
WORK=${WORK:-/tmp/gpuengine-bench}
bench() { $PY tools/bench_esm.py --systems host $HOST_ARGS --out "$OUT/results.jsonl" "$@" 2>&1 | grep -E '^\{|Error|error' ; }
for v in ${VARIANTS:-base si0.5 si0.1 shm noinput spy spygil}; do
  echo "## $v"
  case $v in
    base) bench --workdir "$WORK" ;;
    si*) bench --workdir "$WORK" --switch-interval "${v#si}" ;;
    shm) mkdir -p /dev/shm/gpuengine-bench && cp -n "$WORK"/*.pt /dev/shm/gpuengine-bench/ 2>/dev/null
         bench --workdir /dev/shm/gpuengine-bench; rm -rf /dev/shm/gpuengine-bench ;;
    noinput) GPUENGINE_INPUT_PROCESS=0 bench --workdir "$WORK" ;;
    spy|spygil)
      flag=""; [ "$v" = spygil ] && flag="--gil"
      py-spy record $flag -r 200 -f raw -o "$OUT/pyspy-host-$v.txt" -- \
        $PY tools/bench_esm.py --systems host $HOST_ARGS --workdir "$WORK" --out "$OUT/spy.jsonl" 2>&1 | grep -E '^\{|Error|error'
      $PY tools/pyspy_summary.py "$OUT/pyspy-host-$v.txt" > "$OUT/pyspy-host-$v-summary.txt" 2>&1
      head -60 "$OUT/pyspy-host-$v-summary.txt" ;;
  esac
done
