# adaptune: `make quickstart` and `make test` are all a fresh clone needs (Python 3.10+).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# A CPU build here; on a GPU machine install the CUDA build of torch into .venv first and
# this step leaves it alone.
TORCH_VERSION ?= 2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-test quickstart test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

quickstart: install
	$(BIN)/adaptune train experiments/quickstart.yaml --out runs/train/quickstart-$$(date +%Y%m%d-%H%M%S)

test: install-test
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check search spaces trainables tests benchmarks

clean:
	rm -rf runs .pytest_cache
