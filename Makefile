# The README's two commands: `make run` (install, then the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The example notebooks under nbval: every cell's outputs are compared with the saved ones.
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg notebooks/
# Install once; again only when what the install reads changed (not on every `make test`).
INSTALLED := $(VENV)/.installed
LABEXT := dspool_jupyter/labextension/static/style.js
LAB_SOURCES := $(wildcard labextension/src/*.ts labextension/style/*) \
	labextension/package.json labextension/yarn.lock

.PHONY: install run test lint notebooks

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The editable install builds the lab extension only when it is missing: rebuild it when
# its sources are newer than the build.
$(LABEXT): $(LAB_SOURCES) | $(INSTALLED)
	cd labextension && PATH="$(abspath $(BIN)):$$PATH" jlpm install && \
		PATH="$(abspath $(BIN)):$$PATH" jlpm build:prod
	touch $@

install: $(INSTALLED) $(LABEXT)

# The main job: every example notebook, top to bottom in a fresh kernel (executed copies
# in build/notebooks/), then the plain-Python quickstart.
run: install
	$(BIN)/python notebooks/run_all.py
	$(BIN)/python examples/quickstart.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd labextension && $(abspath $(BIN))/jlpm install && $(abspath $(BIN))/jlpm lint

test: lint
	$(BIN)/pytest
	$(BIN)/pytest $(NBVAL)

# Re-execute the notebooks in place: refreshes the outputs that nbval compares against.
notebooks: install
	$(BIN)/python notebooks/run_all.py --inplace
