# qcap — every target sets up what it needs. `make help` lists them.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_DISABLE_USAGE_STATS := 1
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONDONTWRITEBYTECODE := 1

.DEFAULT_GOAL := help
.PHONY: help setup test test-all demo lint bench clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "installing qcap and its dependencies into $(VENV) (first time: a few minutes; log: $(VENV)/install.log)"
	@$(BIN)/python -m pip install --upgrade pip > $(VENV)/install.log 2>&1 \
	  && $(BIN)/python -m pip install -e '.[dev]' >> $(VENV)/install.log 2>&1 \
	  || { tail -n 30 $(VENV)/install.log; echo "pip install failed; see $(VENV)/install.log"; exit 1; }
	@touch $(STAMP)

setup: $(STAMP) ## create .venv and install qcap with its dependencies (quick when nothing changed)

test: setup ## the fast test suite
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup ## every test, the slow end-to-end ones too
	$(BIN)/python -m pytest -q

lint: setup ## ruff
	$(BIN)/ruff check .

bench: setup ## speed benchmarks against their references (prints ratios; see BENCHMARKS.md)
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

demo: setup ## the main job on the embedded pool
	@bash demo.sh

clean: ## remove run outputs (keeps .venv)
	rm -rf runs
