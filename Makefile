# The two set-up commands: `make demo` runs the example app, `make test` runs every check.
# Both create .venv when it is missing and install the package into it in editable mode.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: demo test chromium bench bench-quick

demo: $(VENV)/.installed-dev
	$(BIN)/python examples/demo.py --port $(PORT)

# Tools run as `python -m`, so a venv that was moved or copied still uses its own Python.
test: $(VENV)/.installed-all
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest

# Benchmarks against plain BackgroundTasks (docs/benchmarks.md). They use Redis and
# PostgreSQL on 127.0.0.1 when those are reachable. `make bench` took 10 to 12 minutes on
# two cores; `make bench-quick` (about a minute) only checks that every benchmark still runs.
bench: $(VENV)/.installed-all
	$(BIN)/python -m benchmarks

bench-quick: $(VENV)/.installed-all
	$(BIN)/python -m benchmarks --quick

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# A stamp file marks each install as done; a change to pyproject.toml installs again.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

$(VENV)/.installed-all: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev,redis,postgres]'
	touch $@

# The browser tests drive Debian's Chromium at /usr/bin/chromium: Playwright (in the dev
# extra) downloads no browser of its own here. Without it those tests skip, except in CI.
chromium:
	@if [ -x /usr/bin/chromium ]; then \
		echo "Chromium is installed at /usr/bin/chromium."; \
	else \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	fi
