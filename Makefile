# The two commands of the README: `make run` and `make test`.
# Each sets up the virtual environment it needs (once; again when pyproject.toml changes).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/chest_xray

.PHONY: run test smoke-train clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[train,serve,dev]'
	touch $@

## run: set up and run the main job (until the shipped model exists: a short training run)
run: $(VENV)/.installed
	$(BIN)/pneumoscan train --data $(DATA) --epochs 1 --limit-train-batches 8 --limit-val-batches 4 --out runs/quickstart

## test: set up and run the test suite
test: $(VENV)/.installed
	$(BIN)/python -m pytest

clean:
	rm -rf runs .pytest_cache test-output
