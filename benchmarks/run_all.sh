#!/usr/bin/env bash
# The full runs behind BENCHMARKS.md (about 10 minutes on a quiet 2-core machine).
#   tidings bench --setup            # once: python-socketio, matplotlib, npm ws
#   bash benchmarks/run_all.sh [SCENARIO...]   # writes bench-results/full-<time>/<scenario>/
#   .venv/bin/python benchmarks/collect.py bench-results/full-<time> --write   # tables -> BENCHMARKS.md
# The code measured is a snapshot of the committed HEAD (git archive), so edits in progress in the
# work tree do not leak into the numbers; its commit is recorded in every report.
# Each run first waits (at most WAIT_QUIET seconds) for a 1-minute load average below 0.5.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${OUT:-$ROOT/bench-results/full-$(date +%Y%m%d-%H%M%S)}
WAIT=${WAIT_QUIET:-600}
SNAP=$(mktemp -d /tmp/tidings-bench-src.XXXXXX)
trap 'rm -rf "$SNAP"' EXIT
git archive HEAD src | tar -x -C "$SNAP"
export PYTHONPATH="$SNAP/src" TIDINGS_BENCH_COMMIT="$(git rev-parse --short HEAD)"
export TIDINGS_BENCHMARKS_DIR="$ROOT/benchmarks"
# Optional arguments name the scenarios to run (default: all of them).
ONLY=" ${*:-connect memory fanout order-status reconnect-storm presence} "
run() {
  local name=$1; shift
  [[ $ONLY == *" $name "* ]] || return 0
  "$PY" -m tidings bench "$name" "$@" --wait-quiet "$WAIT" --out "$OUT/$name"
}
run connect -n 10000 --rate 1000 --against all
run memory -n 10000 --against all
run fanout -n 10000 --rate 2 --duration 15 --against all
run order-status -n 10000 --rate 200 --duration 10
run reconnect-storm -n 10000 --rate 20 --channels 100 --against tidings,ceiling,node-ws
run presence -n 500 --rate 500
echo "results in $OUT"
