# The README's two commands:
#   make run   — install, create the default dataset if data/ is empty, run the DVC pipeline
#   make test  — install with test extras, run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test test-fast lint format install install-test data clean-outputs tracking-server

run: install data
	$(BIN)/facecal pipeline

test: install-test
	$(BIN)/python -m pytest

# The inner loop: everything not marked slow (subprocess pipelines, trainings, servers).
test-fast: install-test
	$(BIN)/python -m pytest -m "not slow"

# What CI checks before the tests: lint, formatting, types.
lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The stamps re-run pip only when pyproject.toml changes.
install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

# The embedded default dataset, rendered (deterministically) only when data/ is empty.
data: install
	@if [ -z "$$(ls -A data 2>/dev/null)" ]; then \
		$(BIN)/facecal data synth --out data; \
	else echo "data/ is not empty: using it"; fi

clean-outputs:
	rm -rf outputs metrics plots eval

# A team MLflow tracking server: PostgreSQL backend (a private cluster from Debian's postgresql
# package unless FACECAL_TRACKING_DB_URI names one), artifacts proxied through the server, on
# 127.0.0.1:5000 unless FACECAL_TRACKING_HOST/PORT say otherwise (scripts/tracking-server.sh).
# install-test: the PostgreSQL driver (psycopg2-binary) is in the test extras.
tracking-server: install-test
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/tracking-server.sh start
