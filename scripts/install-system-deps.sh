#!/usr/bin/env bash
# Installs what the test suite needs from Debian's packages and npm, only when missing.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)  # the cluster tests create a cluster with it
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
command -v node >/dev/null 2>&1 || need+=(nodejs npm)
# Browser tests (tests/web) drive Debian's Chromium through Playwright; never `playwright install`.
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing system packages: ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  # Debian starts services on install; the tests start their own throwaway servers.
  $SUDO service redis-server stop >/dev/null 2>&1 || true
  $SUDO service nginx stop >/dev/null 2>&1 || true
fi
if [ -f tests/js/package.json ] && [ ! -d tests/js/node_modules ]; then
  (cd tests/js && npm install --no-audit --no-fund --loglevel=error)
fi
# The bench's Node.js reference server (tests/bench runs it at tiny N).
if [ -f benchmarks/node/package.json ] && [ ! -d benchmarks/node/node_modules ]; then
  (cd benchmarks/node && npm ci --no-audit --no-fund --loglevel=error)
fi
