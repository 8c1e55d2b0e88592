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

## run: set up and start the web app with the shipped model (http://127.0.0.1:8000/)
run: $(VENV)/.installed
	$(BIN)/pneumoscan serve --host 127.0.0.1 --port 8000

## test: set up and run the test suite (Debian packages the tests start: apt-get install chromium orthanc orthanc-dicomweb dcmtk dicom3tools)
test: $(VENV)/.installed
	$(BIN)/python -m pytest

clean:
	rm -rf runs .pytest_cache test-output
