# Quotra — the two commands: `make demo` and `make test`. Everything sets itself up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/node_modules/.bin:$(CURDIR)/$(BIN):$(PATH)
# ape keeps its data (compiled dependencies, accounts) inside the project, never in $HOME.
export APE_DATA_FOLDER ?= $(CURDIR)/.cache/ape
FUZZ_EXAMPLES ?= 150

.PHONY: all setup compile test lint format demo bench clean

all: setup

$(BIN)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

node_modules/.installed: package.json package-lock.json
	# `npm install --no-save` honours the lock file; `npm ci` refuses a lock that, as npm 11
	# writes it, only lists this platform's anvil binary.
	npm install --no-save --no-audit --no-fund --loglevel=error
	touch $@

setup: $(BIN)/.installed node_modules/.installed

compile: setup
	$(BIN)/ape compile

# ape's test isolation tracks fixtures by name across a session, so each group of contract
# tests whose fixtures share names at different scopes runs in its own pytest session.
PYTEST := $(BIN)/pytest -q -p no:cacheprovider
test: compile
	$(PYTEST) tests/contracts/unit
	$(PYTEST) tests/contracts/test_mock_usdc.py tests/contracts/test_twin.py
	$(PYTEST) tests/contracts/test_scripts.py
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PYTEST) tests/contracts/invariants
	tools/with-postgres.sh $(PYTEST) tests/backend tests/e2e

lint: setup
	$(BIN)/ruff check backend scripts tests bench
	$(BIN)/ruff format --check backend scripts tests bench
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix backend scripts tests bench
	$(BIN)/ruff format backend scripts tests bench

demo: compile
	$(BIN)/quotra demo

bench: compile
	$(BIN)/python bench/gas.py
	$(BIN)/python bench/relay_overhead.py

clean:
	rm -rf .build .cache data $(VENV) node_modules
