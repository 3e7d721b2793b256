# pbxguard — two commands: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The real-Asterisk tests run when a binary is found: PBXGUARD_ASTERISK_BIN, else `asterisk` on PATH,
# else a local build in /opt/asterisk; they skip with a message otherwise.
PBXGUARD_ASTERISK_BIN ?= $(firstword $(shell command -v asterisk 2>/dev/null) $(wildcard /opt/asterisk/sbin/asterisk))
export PBXGUARD_ASTERISK_BIN

.PHONY: run test lint typecheck unit bench bench-full bench-smoke soak clean install dev

$(BIN)/pbxguard: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[speed]'
	touch $@

$(VENV)/.dev: $(BIN)/pbxguard
	$(BIN)/python -m pip install --quiet -e '.[dev,speed]'
	touch $@

install: $(BIN)/pbxguard
dev: $(VENV)/.dev

# Creates the environment, starts (or re-attaches to) the embedded PostgreSQL, migrates, runs the daemon.
run: $(BIN)/pbxguard
	$(BIN)/pbxguard db migrate
	exec $(BIN)/pbxguard run --log-format text

lint: dev
	$(BIN)/ruff check pbxguard tests bench

typecheck: dev
	$(BIN)/mypy --strict pbxguard

# The tests start their own throwaway PostgreSQL cluster (and a private Asterisk when one is found).
unit: dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The benchmarks' smoke run: every path exercised, no speed asserted (the figures are in `make bench`).
bench-smoke: dev
	$(BIN)/python -m bench --quick

test: lint typecheck unit bench-smoke

bench: dev
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-full: dev
	$(BIN)/python -m bench --full

# Mixed traffic through every gate with a fault every minute; lost, duplicated, over cap and memory.
# SOAK_ARGS: --minutes 30 --rate 200 --fault-every 60 (the defaults).
soak: dev
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build *.egg-info
