PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint deps clean web

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

## Run the server on 0.0.0.0:4000 (embedded mode: in-memory broker, no database needed).
run: $(STAMP)
	$(BIN)/tidings serve --host 0.0.0.0 --port 4000

deps:
	bash scripts/install-system-deps.sh

## Rebuild the browser bundles (demo page, supabase-js inside) into src/tidings/server/static/.
## The output is committed: `make run` never needs npm.
web:
	cd web && npm ci --no-audit --no-fund --loglevel=error && node build.mjs

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

## Lint, type-check and run the whole test suite (installs what is missing first).
test: $(STAMP) deps lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) tests/js/node_modules web/node_modules .pytest_cache .mypy_cache .ruff_cache
