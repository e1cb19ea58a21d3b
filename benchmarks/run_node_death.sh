#!/usr/bin/env bash
# The "(c) Node death with replay through nginx" runs of BENCHMARKS.md.
#   bash benchmarks/run_node_death.sh
# Starts a throwaway Redis (benchmarks/throwaway_redis.py), runs `tidings bench node-death` (two
# nodes on it behind nginx, one SIGKILLed) for each client count in CLIENTS, with REDIS_URL as is
# (POOLS="default 2000" also runs with `?max_connections=2000`, as the runs before 14d60c9 did).
# Results in bench-results/node-death-<time>/; tables: benchmarks/collect_node_death.py <folder>.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${OUT:-$ROOT/bench-results/node-death-$(date +%Y%m%d-%H%M%S)}
WAIT=${WAIT_QUIET:-120}
mkdir -p "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
"$PY" benchmarks/throwaway_redis.py > "$OUT/redis.url" & PIDS+=($!)
for _ in $(seq 100); do [[ -s $OUT/redis.url ]] && break; sleep 0.2; done
URL=$(head -1 "$OUT/redis.url")
for n in ${CLIENTS:-10000 5000 3000}; do
  for pool in ${POOLS:-default}; do
    url=$URL; [[ $pool != default ]] && url="$URL?max_connections=$pool"
    dir="$OUT/n$n-pool$pool"; [[ -e $dir ]] && dir="$dir-$(date +%H%M%S)"
    "$PY" -m tidings bench node-death -n "$n" --redis-url "$url" --wait-quiet "$WAIT" --quiet --out "$dir" \
      || echo "n=$n pool=$pool failed" >&2
  done
done
echo "results in $OUT"
