# Quotra — the two commands: `make demo` and `make test`. Everything sets itself up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/node_modules/.bin:$(CURDIR)/$(BIN):$(PATH)
# ape keeps its data (compiled dependencies, accounts) inside the project, never in $HOME.
export APE_DATA_FOLDER ?= $(CURDIR)/.cache/ape
FUZZ_EXAMPLES ?= 150

.PHONY: all setup compile test lint format demo bench bench-setup clean

all: setup

$(BIN)/.installed: requirements.lock pyproject.toml
	@echo "setup: a virtual environment in $(VENV) with the pinned packages of requirements.lock"
	@echo "       (web3, ape, Vyper, FastAPI, SQLAlchemy...; a few minutes the first time)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

node_modules/.installed: package.json package-lock.json
	@echo "setup: anvil (Foundry's local chain) and the pages' browser libraries (marked, DOMPurify)"
	@echo "       from npm, pinned in package-lock.json"
	# `npm install --no-save` honours the lock file; `npm ci` refuses a lock that, as npm 11
	# writes it, only lists this platform's anvil binary.
	npm install --no-save --no-audit --no-fund --loglevel=error
	touch $@

# The marketplace pages' browser libraries (pinned in package.json), copied into the relay's
# static files, which ship them as package data.
WEB_VENDOR := backend/quotra/web/static/vendor
$(WEB_VENDOR)/.copied: node_modules/.installed tools/web_vendor.py
	$(PYTHON) tools/web_vendor.py
	touch $@

setup: $(BIN)/.installed node_modules/.installed $(WEB_VENDOR)/.copied

compile: setup
	$(BIN)/ape compile

# ape's test isolation tracks fixtures by name across a session, so each group of contract
# tests whose fixtures share names at different scopes runs in its own pytest session.
PYTEST := $(BIN)/pytest -q -p no:cacheprovider
test: compile
	$(PYTEST) tests/contracts/unit
	$(PYTEST) tests/contracts/test_mock_usdc.py tests/contracts/test_twin.py tests/contracts/test_framework.py
	$(PYTEST) tests/contracts/test_scripts.py
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PYTEST) tests/contracts/invariants
	tools/with-postgres.sh $(PYTEST) tests/backend tests/e2e
	@# The marketplace pages in headless Chromium (Debian's `chromium`; .ci/run installs it).
	@if [ -n "$$QUOTRA_CHROMIUM" ] || command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then \
		$(PYTEST) tests/web; \
	else \
		echo "make test: the browser tests (tests/web) did NOT run: Chromium is not installed (apt-get install chromium)"; \
	fi

lint: setup
	$(BIN)/ruff check backend scripts tests bench
	$(BIN)/ruff format --check backend scripts tests bench
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix backend scripts tests bench
	$(BIN)/ruff format backend scripts tests bench

# The story, then the marketplace left running for a person with a wallet (Ctrl-C stops it).
demo: compile
	$(BIN)/quotra demo --keep

# The relay benchmark (bench/README.md). LiteLLM and the bench's own tools (matplotlib, py-spy,
# uvloop) get their own virtual environments under .cache/bench, never the project's; wrk and
# strace come from Debian. BENCH_QUICK=1: one short round (a few minutes); BENCH_POSTGRES=1: also
# Quotra on a throw-away PostgreSQL; BENCH_PROFILE=x402,prepaid: py-spy profiles of those paths;
# BENCH_ARGS: any other bench/run.py option.
BENCH_VENVS := .cache/bench
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
BENCH_ARGS ?=
BENCH_RUN_ARGS := $(BENCH_ARGS) $(if $(BENCH_QUICK),--quick) $(if $(BENCH_PROFILE),--profile $(BENCH_PROFILE))

$(BENCH_VENVS)/%/.installed: bench/requirements-%.txt
	$(PYTHON) -m venv $(BENCH_VENVS)/$*
	$(BENCH_VENVS)/$*/bin/pip install --quiet --upgrade pip
	$(BENCH_VENVS)/$*/bin/pip install --quiet -r $<
	touch $@

bench-setup: compile $(BENCH_VENVS)/litellm/.installed $(BENCH_VENVS)/tools/.installed
	@command -v wrk >/dev/null && command -v perf >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk linux-perf; }

bench: bench-setup
ifdef BENCH_POSTGRES
	tools/with-postgres.sh $(BIN)/python bench/run.py --store both $(BENCH_RUN_ARGS)
else
	$(BIN)/python bench/run.py $(BENCH_RUN_ARGS)
endif

clean:
	rm -rf .build .cache data $(VENV) node_modules
