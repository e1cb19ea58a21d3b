#!/usr/bin/env bash
# The full runs behind BENCHMARKS.md (about 10 minutes on a quiet 2-core machine).
#   tidings bench --setup            # once: python-socketio, matplotlib, npm ws
#   bash benchmarks/run_all.sh       # writes bench-results/full-<time>/<scenario>/
#   python benchmarks/collect.py bench-results/full-<time>   # refreshes the tables in BENCHMARKS.md
# Each run first waits (at most WAIT_QUIET seconds) for a 1-minute load average below 0.5.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${TIDINGS:-.venv/bin/tidings}
OUT=${OUT:-bench-results/full-$(date +%Y%m%d-%H%M%S)}
WAIT=${WAIT_QUIET:-600}
run() { local name=$1; shift; "$BENCH" bench "$name" "$@" --wait-quiet "$WAIT" --out "$OUT/$name"; }
run connect -n 10000 --rate 1000 --against all
run memory -n 10000 --against all
run fanout -n 10000 --rate 2 --duration 15 --against all
run order-status -n 10000 --rate 200 --duration 10
run reconnect-storm -n 10000 --rate 20 --channels 100
run presence -n 500 --rate 500
echo "results in $OUT"
