#!/usr/bin/env bash
# The "order-status via PostgreSQL" and "Scale-out (Redis)" runs of BENCHMARKS.md.
#   bash benchmarks/run_pg_redis.sh [pg] [redis]     # default: both
# Starts a throwaway PostgreSQL (wal_level=logical) and a throwaway Redis (benchmarks/throwaway_*.py),
# runs the benches against them, stops them. Results in bench-results/pgredis-<time>/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=${OUT:-$ROOT/bench-results/pgredis-$(date +%Y%m%d-%H%M%S)}
WAIT=${WAIT_QUIET:-60}
PARTS=" ${*:-pg redis} "
mkdir -p "$OUT"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
bench() { "$PY" -m tidings bench "$@" --wait-quiet "$WAIT" --quiet; }
if [[ $PARTS == *" pg "* ]]; then
  "$PY" benchmarks/throwaway_postgres.py > "$OUT/pg.dsn" & PIDS+=($!)
  while [[ ! -s $OUT/pg.dsn ]]; do sleep 0.2; done
  DSN=$(head -1 "$OUT/pg.dsn")
  for rate in ${PG_RATES:-500 1000 2000 3000}; do
    bench order-status -n 10000 --rate "$rate" --duration 10 --source postgres --database-url "$DSN" \
      --out "$OUT/pg-$rate"
  done
fi
if [[ $PARTS == *" redis "* ]]; then
  "$PY" benchmarks/throwaway_redis.py > "$OUT/redis.url" & PIDS+=($!)
  while [[ ! -s $OUT/redis.url ]]; do sleep 0.2; done
  URL=$(head -1 "$OUT/redis.url")
  AGAINST=tidings,tidings-redis,tidings-cluster
  bench fanout -n 5000 --rate 2 --duration 15 --against $AGAINST --redis-url "$URL" --out "$OUT/fanout"
  bench order-status -n 5000 --rate 200 --duration 10 --against $AGAINST --redis-url "$URL" --out "$OUT/order"
  for rate in ${REDIS_RATES:-5000 10000 15000 20000 30000}; do
    "$PY" benchmarks/redis_throughput.py --redis-url "$URL" --rate "$rate" --duration 5 > "$OUT/redis-$rate.json"
  done
fi
echo "results in $OUT"
