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

# The data-efficiency ladder (qcap subset): the same images with real captions only (DataComp)
# and with real + synthetic captions (DR), at each fraction, one seed, so smaller rungs are
# nested in larger ones. e.g.  make subsets DR=runs/demo/dr FRACTIONS="1.0 0.1 0.01"
DR ?= runs/demo/dr
LADDER ?= $(DR)-ladder
SEED ?= 0
FRACTIONS ?= 1.0 0.1
.PHONY: subsets
subsets: setup ## ladder of DR: LADDER/datacomp-P and LADDER/dr-P for P in FRACTIONS (vars: DR LADDER SEED FRACTIONS)
	@test -f "$(DR)/sizes.json" || { echo "DR=$(DR) is not a shard folder: build it with qcap build-dr, or pass DR=..."; exit 2; }
	@for f in $(FRACTIONS); do \
	  pct=$$(awk "BEGIN { print $$f * 100 }"); \
	  for rung in real:datacomp keep:dr; do \
	    $(BIN)/qcap subset --shards "$(DR)" --fraction $$f --seed $(SEED) --captions $${rung%%:*} \
	      --out "$(LADDER)/$${rung##*:}-$$pct" || exit 1; \
	  done; \
	done
	@echo "ladder: $(LADDER)/{datacomp,dr}-{$$(for f in $(FRACTIONS); do awk "BEGIN { printf \"%s \", $$f * 100 }"; done | sed 's/ $$//; s/ /,/g')} (seed $(SEED)); each has README.md, uids.npy, sizes.json"
