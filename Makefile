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

## run: set up and run the main job: the shipped model on test X-rays, with heat maps
## (the web app replaces this when it lands)
run: $(VENV)/.installed
	$(BIN)/pneumoscan predict $(DATA)/test/NORMAL/IM-0001-0001.jpeg $(DATA)/test/NORMAL/IM-0003-0001.jpeg \
		$(DATA)/test/PNEUMONIA/person1_virus_6.jpeg $(DATA)/test/PNEUMONIA/person100_bacteria_475.jpeg \
		--heatmaps runs/heatmaps
	@echo "heat maps: runs/heatmaps/"

## test: set up and run the test suite (the browser test needs Debian's chromium: apt-get install chromium)
test: $(VENV)/.installed
	$(BIN)/python -m pytest

clean:
	rm -rf runs .pytest_cache test-output
