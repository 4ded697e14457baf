# The two commands: `make run` and `make test`. Both set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup system-deps run test lint demo sandbox bench bench-throughput bench-n8n clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests need: Chromium for the dashboard's browser test.
system-deps:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: run 'sudo apt-get install chromium'" >&2; exit 1; fi; \
	fi

run: $(STAMP)
	$(BIN)/clientsync run

demo: $(STAMP)
	$(BIN)/clientsync demo

sandbox: $(STAMP)
	$(BIN)/clientsync sandbox

lint: $(STAMP)
	$(BIN)/ruff check worker tasks tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# Three test processes: the stack-running tests in one, in order; the in-process tests spread
# over all three (tests/conftest.py). `$(BIN)/pytest tests/test_x.py` runs one file alone.
test: $(STAMP) system-deps lint
	$(BIN)/pytest -n 3 --dist loadgroup

bench: $(STAMP)
	$(BIN)/python bench/bench_e2e.py

# Issue 10: clientsync side by side with its baselines (docs/benchmarks.md, "Throughput (issue 10)").
# Run on a quiet machine. Needs wrk (installed here when run as root). Extra flags: BENCH_ARGS="...".
BENCH_ARGS ?=
bench-throughput: $(STAMP)
	@if ! command -v wrk >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; \
	  else echo "wrk is missing: run 'sudo apt-get install -y wrk'" >&2; exit 1; fi; \
	fi
	$(BIN)/python bench/bench_throughput.py all $(BENCH_ARGS)

# Issue 10's ">= 10x n8n": n8n and clientsync in one run, webhook -> the Invoice Ninja sandbox at 100 ms
# (docs/n8n-bench-report.md). Installs n8n $(N8N_VERSION) into var/n8n (npm, Node.js 20+) on first use;
# xlsx is pinned to its npm release because n8n's own pin points at cdn.sheetjs.com. Extra flags: BENCH_ARGS="...".
N8N_VERSION := 2.8.4
N8N_DIR := var/n8n
N8N_BIN := $(N8N_DIR)/node_modules/.bin/n8n
$(N8N_BIN):
	@command -v npm >/dev/null 2>&1 || { echo "npm is missing: install Node.js 20+ and npm" >&2; exit 1; }
	mkdir -p $(N8N_DIR)
	printf '%s\n' '{"name": "n8n-bench", "private": true, "dependencies": {"n8n": "$(N8N_VERSION)"}, "overrides": {"xlsx": "0.18.5"}}' > $(N8N_DIR)/package.json
	cd $(N8N_DIR) && SCARF_ANALYTICS=false DO_NOT_TRACK=1 npm install --no-audit --no-fund --loglevel=error

bench-n8n: $(STAMP) $(N8N_BIN)
	$(BIN)/python bench/bench_n8n.py --n8n-bin $(N8N_BIN) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
