#!/usr/bin/env bash
# Same-machine, alternated A/B of the host pipeline (tools/bench_host_dna.py): this tree against
# an earlier commit's, run in turn on one machine (machines of the device kind differ by up to
# 40 %, so only pairs from one call compare). Export the earlier tree first into a folder git
# ignores and carry it with the wheels:
#   mkdir -p .devrun/old && git archive <commit> gpuengine tools | tar -x -C .devrun/old
#   carry: .whl .devrun
#   command: OLD=<commit> NEW=<commit> SKIP_TESTS=1 bash tools/bench_host_ab.sh
# Variants (VARIANTS, default "before-w2 after-w2"): before-wN / after-wN run the earlier /
# this tree with --writers N, and with a suffix -f16 into a float16 table (--store-dtype
# float16: an A/B of the store dtype on one tree; the earlier tree needs the option); ROUNDS (default "1 2") alternates them. HOST_AB_ARGS overrides the
# bench's arguments (default: 2 M reads, 8 no-op devices, budget 65 536, 16 cores). Only
# $OUT/results.jsonl is written to $OUT (the device tool returns at most 8 files); each row
# carries `variant` and a note "A/B (same machine, alternated)". Runs anywhere (no GPU needed):
# OLD_TREE, PYTHON and SITE (default /tmp/site, device_check.sh's wheels) can be changed.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOGS=${LOGS:-$(mktemp -d)}; mkdir -p "$LOGS"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
OLD_TREE=${OLD_TREE:-.devrun/old}
: "${OLD:?OLD=<the earlier commit> (its tree exported into $OLD_TREE)}" "${NEW:?NEW=<the commit of this tree>}"
[ -d "$OLD_TREE/gpuengine" ] || { echo "bench_host_ab: no tree in $OLD_TREE" >&2; exit 2; }
if [ -d .whl ] && [ "${SKIP_INSTALL:-0}" != 1 ]; then
  SKIP_TESTS=1 bash tools/device_check.sh > "$LOGS/setup.log" 2>&1 || { tail -20 "$LOGS/setup.log"; exit 1; }
fi
ARGS=${HOST_AB_ARGS:---reads 2000000 --devices 8 --budget 65536 --workdir /tmp/host-ab --cores 16}
here=$PWD
run() {  # variant tree writers commit [bench_host_dna options]
  local variant=$1 tree=$2 writers=$3 commit=$4; shift 4
  (cd "$tree" && PYTHONPATH=$SITE:$PWD $PY tools/bench_host_dna.py $ARGS --writers "$writers" \
      --commit "$commit" "$@" --out "$LOGS/raw.jsonl" > "$LOGS/$variant.log" 2>&1) \
    || { tail -5 "$LOGS/$variant.log"; return 1; }
  $PY - "$variant" "$LOGS/raw.jsonl" "$OUT/results.jsonl" <<'PY'
import json, sys
variant, raw, out = sys.argv[1:]
row = json.loads(open(raw).read().splitlines()[-1])
row["variant"] = variant
row["note"] = "A/B (same machine, alternated): " + row.get("note", "")
with open(out, "a") as f:
    f.write(json.dumps(row) + "\n")
validated = row.get("validate_s", row["wall_s"] - row["embed_s"])  # before: an upper bound
print(f"{variant:12s} {row['commit']} {row['sequences_per_s'] / 1e3:8.1f} k/s  engine "
      f"{row['main_cpu_us_per_seq']:5.2f} us/read  embed {row['embed_s']:5.1f} s  "
      f"validate {validated:4.1f} s  commits {row['commit_seconds']:5.1f} s", flush=True)
PY
}
# a first run of the earlier tree makes the input and warms the caches; not recorded
(cd "$OLD_TREE" && PYTHONPATH=$SITE:$PWD $PY tools/bench_host_dna.py $ARGS --writers 2 \
    --commit "$OLD" --out "$LOGS/warm.jsonl" > "$LOGS/warm.log" 2>&1) || tail -5 "$LOGS/warm.log"
status=0
for round in ${ROUNDS:-1 2}; do
  for variant in ${VARIANTS:-before-w2 after-w2}; do
    dtype=(); writers=${variant#*-w}; writers=${writers%-f16}
    case $variant in *-f16) dtype=(--store-dtype float16) ;; esac
    case $variant in
      before-w[0-9]*) run "$variant" "$OLD_TREE" "$writers" "$OLD" "${dtype[@]}" || status=1 ;;
      after-w[0-9]*) run "$variant" "$here" "$writers" "$NEW" "${dtype[@]}" || status=1 ;;
      *) echo "bench_host_ab: unknown variant $variant (before-wN or after-wN, -f16)" >&2
         exit 2 ;;
    esac
  done
done
exit $status
