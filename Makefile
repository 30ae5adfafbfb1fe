# layerfs — one Makefile. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_SYS := $(VENV)/.system-deps
STAMP_PY := $(VENV)/.python-deps
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: help deps venv demo test check lint typecheck stress bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP_SYS): scripts/install-system-deps.sh
	@mkdir -p $(VENV)
	bash scripts/install-system-deps.sh
	@touch $@

$(STAMP_PY): pyproject.toml $(STAMP_SYS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

deps: $(STAMP_SYS) $(STAMP_PY) ## Install system packages (apt-get) and the Python venv

venv: deps

demo: deps ## Build a sample image with real tools, import, mount, show, write, unmount
	bash scripts/demo.sh

test: deps ## Run the whole test suite (unit, store, mounted)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: deps ## ruff lint + format check
	$(VENV)/bin/ruff check unionfs layerstore tests scripts
	$(VENV)/bin/ruff format --check unionfs layerstore tests scripts

typecheck: deps ## mypy --strict
	$(VENV)/bin/mypy

check: lint typecheck test ## ruff, mypy --strict and the test suite

stress: deps ## Long randomized runs (minutes); not part of `make test`
	LAYERFS_STRESS=1 $(PY) -m pytest -m "stress or not stress" $(PYTEST_ARGS)

bench: deps ## Benchmark against kernel overlayfs and fuse-overlayfs (by hand, not a test)
	$(PY) scripts/bench.py $(BENCH_ARGS)

clean: ## Remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
