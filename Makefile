PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check
# Two stamps: serving needs the package alone (`pip install -e .`); linting and the tests need the
# dev extra on top (pytest, mypy, ruff, playwright, the official Python client, redis, ...).
RUN_STAMP := $(VENV)/.run-stamp
DEV_STAMP := $(VENV)/.dev-stamp

.PHONY: run test lint deps clean web

$(BIN)/python:
	@echo "make: creating $(VENV)"
	@$(PY) -m venv $(VENV)

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	@echo "make: installing Tidings into $(VENV) (pip install -e .)"
	@$(PIP) -e .
	@touch $@

$(DEV_STAMP): pyproject.toml $(RUN_STAMP)
	@echo "make: installing the test tooling into $(VENV) (pip install -e '.[dev]')"
	@$(PIP) -e '.[dev]'
	@touch $@

## Run the server on localhost:4000 (embedded mode: in-memory broker, no database needed).
## Settings come from the environment: `PORT=4001 JWT_SECRET=... make run`. On Ctrl-C the server
## drains and exits 0, so make reports no `*** Interrupt` / `*** Terminated`.
run: $(RUN_STAMP)
	@exec $(BIN)/tidings serve

deps:
	bash scripts/install-system-deps.sh

## Rebuild the browser bundles (demo page, supabase-js inside) into src/tidings/server/static/.
## The output is committed: `make run` never needs npm.
web:
	cd web && npm ci --no-audit --no-fund --loglevel=error && node build.mjs

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

## Lint, type-check and run the whole test suite (installs what is missing first).
test: $(DEV_STAMP) deps lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) tests/js/node_modules web/node_modules .pytest_cache .mypy_cache .ruff_cache
