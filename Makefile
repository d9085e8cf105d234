# adaptune: `make quickstart` and `make test` are all a fresh clone needs (Python 3.10+).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# A CPU build here; on a GPU machine install the CUDA build of torch into .venv first and
# this step leaves it alone.
TORCH_VERSION ?= 2.13.0
CHROMIUM ?= /usr/bin/chromium
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-test quickstart test lint clean bench bench-quick

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e .
	touch $@

# The browser test (tests/test_ui_browser.py) drives Debian's chromium with Playwright; the
# browser comes from apt, never from `playwright install` (a download).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	@if [ ! -x $(CHROMIUM) ]; then \
	  if ! command -v apt-get >/dev/null; then \
	    echo "note: no $(CHROMIUM) and no apt-get: install Chromium at $(CHROMIUM);" \
	      "until then tests/test_ui_browser.py is skipped"; \
	  elif [ "$$(id -u)" = 0 ]; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	  elif command -v sudo >/dev/null; then \
	    sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	  else \
	    echo "note: no $(CHROMIUM); as root run: apt-get install -y chromium;" \
	      "until then tests/test_ui_browser.py is skipped"; \
	  fi; \
	fi
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Each run is a new search (a new Ray results folder and MLflow parent run) in the MLflow
# experiment "quickstart"; the registered model adaptune-quickstart@champion follows the latest.
quickstart: install
	$(BIN)/adaptune search experiments/quickstart.yaml --name quickstart-$$(date +%Y%m%d-%H%M%S)

test: install-test
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check search spaces trainables tests benchmarks experiments

# docs/benchmarks.md. bench-quick: the trainable's speed against a bare PyTorch loop (minutes).
bench-quick: install
	$(BIN)/python benchmarks/speed.py

# The search-efficiency landscape (a 108-point grid x seeds 0-2 trained for real, ~25 min on
# 2 idle cores) is committed and rerun only when missing: delete the file to measure it again.
benchmarks/results/landscape.json: | $(VENV)/.installed
	$(BIN)/python benchmarks/landscape.py --workers 2

# Every benchmark in docs/benchmarks.md, each printing its table (about 90 min on 2 cores);
# the GPU figures only where torch sees a CUDA device.
bench: install benchmarks/results/landscape.json
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/search_efficiency.py
	@if $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
		$(BIN)/python benchmarks/gpu.py --json benchmarks/results/gpu.json; \
	else echo "no CUDA device: benchmarks/gpu.py skipped"; fi

clean:
	rm -rf runs .pytest_cache
