# The two set-up commands: `make demo` runs the example app, `make test` runs every check.
# Both create .venv when it is missing and install the package into it in editable mode.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000

.PHONY: demo test

demo: $(VENV)/.installed-dev
	$(BIN)/python examples/demo.py --port $(PORT)

# Tools run as `python -m`, so a venv that was moved or copied still uses its own Python.
test: $(VENV)/.installed-all
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# A stamp file marks each install as done; a change to pyproject.toml installs again.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

$(VENV)/.installed-all: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev,redis,postgres]'
	touch $@
