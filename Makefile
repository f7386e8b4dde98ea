# The README's two commands: `make run` (install, then the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'

run: install
	$(BIN)/python examples/quickstart.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd labextension && $(abspath $(BIN))/jlpm install && $(abspath $(BIN))/jlpm lint

test: lint
	$(BIN)/pytest
