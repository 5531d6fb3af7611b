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

# ---------------------------------------------------------------------------------------------
# make demo: the caption-quality ablation end to end on the embedded pool (README, "The demo").
# Every line is the qcap command a user runs on a real pool. Each target is the file its command
# writes last, so an interrupted demo (Ctrl-C, or a kill of the whole process group) continues
# where it stopped when run again, and each command resumes its own unfinished work (shards with
# a .done marker, --resume checkpoints). tools/timed.sh logs every command's wall time and the
# machine's load to $(DEMO)/timings.tsv; the report turns it into the per-stage timing table.
# Vars: DEMO (output folder), SCALE (multiplies data and training; 1 = the 15-minute demo),
# SEEDS (pretraining and finetuning repeated with seeds 0..SEEDS-1), PORT (the world's server),
# JOBS (commands at once) and THREADS (torch threads per command): on 2 cores two one-thread
# commands side by side beat one two-thread command, which slows 5-10x once anything else runs.
DEMO ?= runs/demo
SCALE ?= 1
SEEDS ?= 1
PORT ?= 8765
JOBS ?= 2
THREADS ?= 1
# scaled(BASE,MIN): BASE x SCALE rounded, at least MIN
scaled = $(shell awk 'BEGIN { v = int($(1) * $(SCALE) + 0.5); print (v < $(2) ? $(2) : v) }')
# These bases halved the pool and every training length on 2026-12-03, after the earlier ones (6000, 9600, 19200,
# 100, 9600) took 29 minutes on a 2-core AVX2-only CPU (2026-12-02); SCALE=2 trains as long as they did. SCALE=1 measured 13.3
# minutes on a 2-core AVX512-BF16 CPU and 12.2 with training forced to fp32 and torch limited to AVX2 (README). The clean
# split and the eval sets keep their bases, so the metrics keep their resolution.
POOL_SAMPLES := $(call scaled,3000,300)
CLEAN_SAMPLES := $(call scaled,1000,128)
EVAL_SAMPLES := $(call scaled,400,64)
CAPTIONER_SAMPLES := $(call scaled,4800,256)
CLIP_SAMPLES := $(call scaled,9600,256)
FINETUNE_STEPS := $(call scaled,50,8)
CLIP_TOP_FRACTION ?= 0.5
SEED_LIST := $(shell seq 0 $$(( $(SEEDS) - 1 )))
# the ladder: fractions of the DR set (make science: three of them), their folder suffixes in percent
LADDER_FRACTIONS ?= 1.0 0.1
PCTS := $(foreach f,$(LADDER_FRACTIONS),$(shell awk 'BEGIN { print $(f) * 100 }'))
RUNGS := $(foreach p,$(PCTS),datacomp-$(p) dr-$(p))
DR_FIELDS := text,syn_text
# finetuning knobs (the calibration's): extra flags for every qcap finetune, e.g. --freeze-backbone --image-size 96
FT_EXTRA ?=
# SCIENCE=1 (make science) adds the positive controls (oracle-P: the rung's images with the world's true
# descriptions; clean-100: the clean split's human captions), the MAE baseline, attention distance per seed,
# and the science report; 0 (make demo) is the demo's graph alone
SCIENCE ?= 0
CONTROL_RUNGS := $(if $(filter 1,$(SCIENCE)),$(foreach p,$(PCTS),oracle-$(p)) clean-100)
# the reinforced rung (DataCompDR's dataset reinforcement, MobileCLIP's DR loss): drr-P is dr-P with stored
# augmentations and the embeddings of a teacher CLIP trained on the clean split (qcap reinforce), pretrained with
# --distill-loss-weights at the same samples seen. make demo: drr-100 only (its 15 minutes); make science: every fraction
DRR_PCTS := $(if $(filter 1,$(SCIENCE)),$(PCTS),100)
DRR_RUNGS := $(foreach p,$(DRR_PCTS),drr-$(p))
# (SCIENCE=1) the backbone architecture: MobileCLIP's MCi (qcap-tiny-mci, a FastViT image tower) pretrained on the
# DR and real 100% rungs and a random-init MCi, beside the ViT rows; the demo stays ViT-only
MCI_RUNGS := $(if $(filter 1,$(SCIENCE)),mci-dr-100 mci-datacomp-100)
PRETRAINED := $(RUNGS) $(DRR_RUNGS) $(CONTROL_RUNGS) $(MCI_RUNGS)
BASELINES := random $(if $(filter 1,$(SCIENCE)),mae mci-random)
# dense tasks each backbone is finetuned on; make science adds detection (Mask R-CNN on the world's COCO-layout
# eval/det), which the 15-minute demo leaves out
FT_TASKS := seg depth $(if $(filter 1,$(SCIENCE)),det)

QCAP := $(BIN)/qcap
W := $(DEMO)/world
RAW := $(DEMO)/raw
FILTERS := $(DEMO)/filters
CAPTIONER := $(DEMO)/captioner
CURATED := $(DEMO)/curated
SYN := $(DEMO)/syn
DR_DEMO := $(DEMO)/dr
LADDER_DEMO := $(DEMO)/dr-ladder
CLIP := $(DEMO)/clip
FT := $(DEMO)/finetune
SCORES := $(DEMO)/scores
# run one command as a named stage: print and log its wall time and the load
TIMINGS = $(DEMO)/timings.tsv
TIMED = tools/timed.sh $(TIMINGS)
export QCAP_RUN ?= $(shell date -u +%Y%m%dT%H%M%SZ)

LADDER_SUMMARIES := $(foreach r,$(RUNGS),$(LADDER_DEMO)/$(r)/summary.json)
DRR_SUMMARIES := $(foreach r,$(DRR_RUNGS),$(LADDER_DEMO)/$(r)/summary.json)
CLIP_EVALS := $(foreach s,$(SEED_LIST),$(foreach r,$(PRETRAINED) $(filter mae,$(BASELINES)),$(CLIP)/$(r)-s$(s)/eval.json))
FT_METRICS := $(foreach s,$(SEED_LIST),$(foreach b,$(BASELINES) $(PRETRAINED),$(foreach t,$(FT_TASKS),$(FT)/$(b)-s$(s)/$(t)/metrics.json)))
SCORE_SUMMARIES := $(foreach r,$(RUNGS) $(CONTROL_RUNGS),$(SCORES)/$(r)/summary.json)
ATTENTION := $(DEMO)/attention/attention_distance.json
ATTENTION_SEEDS := $(foreach s,$(SEED_LIST),$(DEMO)/attention/s$(s)/attention_distance.json)
CONTROL_SUMMARIES := $(foreach r,$(CONTROL_RUNGS),$(LADDER_DEMO)/$(r)/summary.json)

.DELETE_ON_ERROR:

demo: setup ## the caption-quality ablation on the embedded pool -> runs/demo/report.md (vars: SCALE SEEDS JOBS DEMO PORT)
	@OMP_NUM_THREADS=$(THREADS) $(MAKE) --no-print-directory -j$(JOBS) $(DEMO)/report.md
	@echo "demo: $(DEMO)/report.md (figures in $(DEMO)/report/, every number's source in $(DEMO)/report.json)"
	@$(if $(filter 1,$(SEEDS)),echo "one seed: the verdicts that need a spread over seeds (DR vs real beyond 2 SE, pretrained vs random init, DR 10% vs real 100%) give directions only; make science runs 3 seeds with the positive controls")

# 1. the world: a DataComp-style pool served over loopback, a clean-caption split, eval sets
$(W)/world.json: | $(STAMP)
	@$(TIMED) world $(QCAP) world --out $(W) --num-samples $(POOL_SAMPLES) --clean-samples $(CLEAN_SAMPLES) \
	  --eval-samples $(EVAL_SAMPLES) --base-url http://127.0.0.1:$(PORT) $(if $(filter det,$(FT_TASKS)),--det-samples $(EVAL_SAMPLES))

# 2. download it with img2dataset on Ray (the server runs only while the download does), basic filter
$(RAW)/manifest.json: $(W)/world.json
	@$(QCAP) serve $(W) --port $(PORT) > $(DEMO)/serve.log 2>&1 & server=$$!; \
	trap 'kill $$server 2>/dev/null; wait $$server 2>/dev/null' EXIT; trap 'exit 130' INT TERM; \
	for i in $$(seq 300); do grep -q ' serving ' $(DEMO)/serve.log && break; kill -0 $$server 2>/dev/null || break; sleep 0.1; done; \
	grep -q ' serving ' $(DEMO)/serve.log || { cat $(DEMO)/serve.log; echo "qcap serve did not start (port $(PORT) in use? make demo PORT=...)"; exit 1; }; \
	$(TIMED) download $(QCAP) download --pool $(W)/pool.parquet --out $(RAW) --distributor ray --processes 2 \
	  --threads 32 --samples-per-shard 1000 --image-size 256 --timeout 5 --retries 1 --allow-private-addresses

$(FILTERS)/basic.npy: $(RAW)/manifest.json
	@$(TIMED) filter-basic $(QCAP) filter basic --shards $(RAW) --out $@

# 3. the captioner: a CoCa trained on the clean split; its contrastive towers are the CLIP-score filter (DFN-style).
# CAPTIONER_VOCAB=1 (the default): a BPE vocabulary fitted to the world's text (qcap fit-vocab; ~800 tokens instead
# of CLIP's 49,408: a 5x cheaper captioner step, and what keeps the demo near 15 minutes on a CPU without bf16) --
# the checkpoint carries its tokenizer, so the later stages need nothing else. CAPTIONER_VOCAB=0: CLIP's tokenizer
CAPTIONER_VOCAB ?= 1
VOCAB := $(DEMO)/vocab
CAPTIONER_MODEL := $(if $(filter 1,$(CAPTIONER_VOCAB)),qcap-tiny-coca-world)
$(VOCAB)/qcap-tiny-coca-world.json: $(W)/world.json
	@$(TIMED) vocab $(QCAP) fit-vocab --world $(W) --out $(VOCAB)
$(CAPTIONER)/eval.json: $(W)/world.json $(if $(CAPTIONER_MODEL),$(VOCAB)/qcap-tiny-coca-world.json)
	@$(if $(CAPTIONER_MODEL),QCAP_MODEL_CONFIGS=$(VOCAB)/qcap-tiny-coca-world.json) $(TIMED) captioner $(QCAP) train \
	  --preset tiny-coca $(if $(CAPTIONER_MODEL),--model $(CAPTIONER_MODEL)) --data $(W)/clean --out $(CAPTIONER) \
	  --samples-seen $(CAPTIONER_SAMPLES) --eval-data $(W)/eval --retrieval-data $(W)/eval/retrieval --resume

# 4. CLIP-score and dedup filters on the basic survivors, their intersection, reshard
$(FILTERS)/clip.npy: $(FILTERS)/basic.npy $(CAPTIONER)/eval.json
	@$(TIMED) filter-clip-score $(QCAP) filter clip-score --shards $(RAW) --subset $(FILTERS)/basic.npy \
	  --checkpoint $(CAPTIONER) --top-fraction $(CLIP_TOP_FRACTION) --out $@ --num-cpus 2

$(FILTERS)/dedup.npy: $(FILTERS)/basic.npy
	@$(TIMED) filter-dedup $(QCAP) filter dedup --shards $(RAW) --subset $(FILTERS)/basic.npy --out $@

$(FILTERS)/curated.npy: $(FILTERS)/clip.npy $(FILTERS)/dedup.npy
	@$(TIMED) uids $(QCAP) uids intersect $^ --out $@

$(CURATED)/summary.json: $(FILTERS)/curated.npy
	@$(TIMED) reshard $(QCAP) reshard --shards $(RAW) --subset $< --out $(CURATED) --samples-per-shard 250

# 5. five synthetic captions per image (top-p 0.9, DataCompDR's recipe), joined by uid into DR shards
$(SYN)/summary.json: $(CURATED)/summary.json $(CAPTIONER)/eval.json
	@$(TIMED) caption $(QCAP) caption --shards $(CURATED) --out $(SYN) --checkpoint $(CAPTIONER) \
	  --num-captions 5 --decoding top_p --top-p 0.9

$(DR_DEMO)/summary.json: $(SYN)/summary.json
	@$(TIMED) build-dr $(QCAP) build-dr --images $(CURATED) --captions $(SYN) --out $(DR_DEMO)

# 6. the ladder: real captions (DataComp) and DR at 100% and 10%, nested
$(LADDER_SUMMARIES) &: $(DR_DEMO)/summary.json
	@$(TIMED) subsets $(MAKE) --no-print-directory subsets DR=$(DR_DEMO) LADDER=$(LADDER_DEMO) FRACTIONS="$(LADDER_FRACTIONS)" SEED=0

# 6b. (SCIENCE=1) positive controls: the same images with the true descriptions; the clean split's captions
$(LADDER_DEMO)/oracle-%/summary.json: $(LADDER_DEMO)/datacomp-%/summary.json
	@$(TIMED) control-rung $(QCAP) control-rung --kind oracle --shards $(LADDER_DEMO)/datacomp-$* --world $(W) --out $(@D)
$(LADDER_DEMO)/clean-100/summary.json: $(LADDER_DEMO)/datacomp-100/summary.json
	@$(TIMED) control-rung $(QCAP) control-rung --kind clean --like $(LADDER_DEMO)/datacomp-100 --world $(W) \
	  --allow-fewer --out $(@D)
$(foreach r,$(CONTROL_RUNGS),$(foreach s,$(SEED_LIST),$(CLIP)/$(r)-s$(s)/eval.json)): $(CONTROL_SUMMARIES)
$(foreach r,$(CONTROL_RUNGS),$(SCORES)/$(r)/summary.json): $(CONTROL_SUMMARIES)

# 6c. the reinforced rung: a teacher CLIP (qcap-tiny-clip) trained on the clean split's human captions, then
# qcap reinforce over dr-P: DRR_AUGMENTATIONS stored crops + RandAugment per image at the student's 64 px, the
# teacher's embeddings of each and of every caption (per-uid seeds: drr-10's images hold drr-100's augmentations)
TEACHER := $(DEMO)/teacher
TEACHER_SAMPLES := $(call scaled,4800,256)
DRR_AUGMENTATIONS ?= 10
$(TEACHER)/eval.json: $(W)/world.json
	@$(TIMED) teacher $(QCAP) train --preset tiny --data $(W)/clean --out $(TEACHER) --caption-source real --seed 0 \
	  --samples-seen $(TEACHER_SAMPLES) --eval-data $(W)/eval --retrieval-data $(W)/eval/retrieval --resume
$(LADDER_DEMO)/drr-%/summary.json: $(LADDER_SUMMARIES) $(TEACHER)/eval.json
	@$(TIMED) reinforce $(QCAP) reinforce --shards $(LADDER_DEMO)/dr-$* --out $(@D) --teachers $(TEACHER) \
	  --num-augmentations $(DRR_AUGMENTATIONS) --size 64 --num-workers 1 --cpus-per-worker 1
$(foreach r,$(DRR_RUNGS),$(foreach s,$(SEED_LIST),$(CLIP)/$(r)-s$(s)/eval.json)): $(DRR_SUMMARIES)

# 7. CLIP on each rung at the same samples seen (DR: the web caption and a synthetic one per image);
# (SCIENCE=1) MAE of the same ViT on the real rung's images, same batch, steps and samples seen
$(CLIP)/mae-s%/eval.json: $(LADDER_SUMMARIES)
	@$(TIMED) pretrain-mae $(QCAP) mae --data $(LADDER_DEMO)/datacomp-100 --out $(@D) --seed $* \
	  --samples-seen $(CLIP_SAMPLES) --resume
# the reinforced rungs: MobileCLIP's DR loss (0.25 CLIP + 0.75 distillation), the web and one synthetic caption per
# image as on dr-P (--dr-mode dual), a stored augmentation drawn per sample
$(CLIP)/drr-%/eval.json: $(LADDER_SUMMARIES)
	@$(TIMED) pretrain-drr $(QCAP) train --preset tiny --data $(LADDER_DEMO)/drr-$(firstword $(subst -s, ,$*)) \
	  --out $(@D) --distill-loss-weights 0.25 0.75 --dr-mode dual --caption-source dual \
	  --seed $(lastword $(subst -s, ,$*)) --samples-seen $(CLIP_SAMPLES) --eval-data $(W)/eval \
	  --retrieval-data $(W)/eval/retrieval --resume
# (SCIENCE=1) the MCi image tower on a rung, same recipe and samples seen as the ViT
$(CLIP)/mci-%/eval.json: $(LADDER_SUMMARIES)
	@$(TIMED) pretrain-mci $(QCAP) train --preset tiny --model qcap-tiny-mci --data $(LADDER_DEMO)/$(firstword $(subst -s, ,$*)) \
	  --out $(@D) --caption-source $(if $(filter dr-%,$*),dual,real) --seed $(lastword $(subst -s, ,$*)) \
	  --samples-seen $(CLIP_SAMPLES) --eval-data $(W)/eval --retrieval-data $(W)/eval/retrieval --resume
$(CLIP)/%/eval.json: $(LADDER_SUMMARIES)
	@$(TIMED) pretrain $(QCAP) train --preset tiny --data $(LADDER_DEMO)/$(firstword $(subst -s, ,$*)) --out $(@D) \
	  --caption-source $(if $(filter dr-%,$*),dual,real) --seed $(lastword $(subst -s, ,$*)) \
	  --samples-seen $(CLIP_SAMPLES) --eval-data $(W)/eval --retrieval-data $(W)/eval/retrieval --resume

# 8. dense-task transfer of every backbone and of a random-init one; caption quality; attention distance
FINETUNE_ARGS = --preset tiny --steps $(FINETUNE_STEPS) --resume $(FT_EXTRA)
$(FT)/random-s%/seg/metrics.json: $(W)/world.json
	@$(TIMED) finetune $(QCAP) finetune seg --random qcap-tiny-clip --seed $* --data $(W)/eval/seg --out $(@D) $(FINETUNE_ARGS)
$(FT)/random-s%/depth/metrics.json: $(W)/world.json
	@$(TIMED) finetune $(QCAP) finetune depth --random qcap-tiny-clip --seed $* --data $(W)/eval/depth --out $(@D) $(FINETUNE_ARGS)
$(FT)/random-s%/det/metrics.json: $(W)/world.json
	@$(TIMED) finetune $(QCAP) finetune det --random qcap-tiny-clip --seed $* --data $(W)/eval/det --out $(@D) $(FINETUNE_ARGS)
$(FT)/mci-random-s%/seg/metrics.json: $(W)/world.json
	@$(TIMED) finetune $(QCAP) finetune seg --random qcap-tiny-mci --seed $* --data $(W)/eval/seg --out $(@D) $(FINETUNE_ARGS)
$(FT)/mci-random-s%/depth/metrics.json: $(W)/world.json
	@$(TIMED) finetune $(QCAP) finetune depth --random qcap-tiny-mci --seed $* --data $(W)/eval/depth --out $(@D) $(FINETUNE_ARGS)
$(FT)/mci-random-s%/det/metrics.json: $(W)/world.json
	@$(TIMED) finetune $(QCAP) finetune det --random qcap-tiny-mci --seed $* --data $(W)/eval/det --out $(@D) $(FINETUNE_ARGS)
$(FT)/%/seg/metrics.json: $(CLIP)/%/eval.json
	@$(TIMED) finetune $(QCAP) finetune seg --checkpoint $(CLIP)/$* --seed $(lastword $(subst -s, ,$*)) \
	  --data $(W)/eval/seg --out $(@D) $(FINETUNE_ARGS)
$(FT)/%/depth/metrics.json: $(CLIP)/%/eval.json
	@$(TIMED) finetune $(QCAP) finetune depth --checkpoint $(CLIP)/$* --seed $(lastword $(subst -s, ,$*)) \
	  --data $(W)/eval/depth --out $(@D) $(FINETUNE_ARGS)
$(FT)/%/det/metrics.json: $(CLIP)/%/eval.json
	@$(TIMED) finetune $(QCAP) finetune det --checkpoint $(CLIP)/$* --seed $(lastword $(subst -s, ,$*)) \
	  --data $(W)/eval/det --out $(@D) $(FINETUNE_ARGS)

$(SCORES)/%/summary.json: $(LADDER_SUMMARIES)
	@$(TIMED) score-captions $(QCAP) score-captions --world $(W) --captions $(LADDER_DEMO)/$* \
	  --field $(if $(filter dr-%,$*),$(DR_FIELDS),text) --out $(@D)

$(ATTENTION): $(CLIP)/dr-100-s0/eval.json $(CLIP)/datacomp-100-s0/eval.json
	@$(TIMED) attention $(QCAP) attention-distance --checkpoint $(CLIP)/dr-100-s0 --label "DR 100%" \
	  --compare $(CLIP)/datacomp-100-s0 --compare-label "real captions 100%" --images $(W)/eval/seg/images/validation \
	  --out $(@D)

$(DEMO)/attention/s%/attention_distance.json: $(CLIP)/dr-100-s%/eval.json $(CLIP)/datacomp-100-s%/eval.json
	@$(TIMED) attention $(QCAP) attention-distance --checkpoint $(CLIP)/dr-100-s$* --label "DR 100%" \
	  --compare $(CLIP)/datacomp-100-s$* --compare-label "real captions 100%" --images $(W)/eval/seg/images/validation \
	  --out $(@D)

# 9. the report: table, verdicts against the paper, figures, per-stage timings
$(DEMO)/report.md: $(CLIP_EVALS) $(FT_METRICS) $(SCORE_SUMMARIES) $(ATTENTION)
	@$(TIMED) report $(QCAP) report $(DEMO) --world $(W)

# 9b. (SCIENCE=1) the depth floor: the RMSE no backbone can go below on this world's depth set, beside
# position-only and constant predictions (the science report's headroom: how much of it each backbone closes)
DEPTH_FLOOR := $(DEMO)/depth-floor/depth_floor.json
$(DEPTH_FLOOR): $(W)/world.json
	@$(TIMED) depth-floor $(QCAP) depth-floor --world $(W) --out $(@D)

# 10. (SCIENCE=1) the science report: controls first (pretrained vs random, oracle vs real, caption premise), then
# the paper's verdicts over the ladder, DR vs MAE and the attention-distance test; DEV_SEEDS are left out of verdicts
DEV_SEEDS ?=
$(DEMO)/science.md: $(DEMO)/report.md $(ATTENTION_SEEDS) $(CONTROL_SUMMARIES) $(DEPTH_FLOOR)
	@$(TIMED) science-report $(QCAP) science-report $(DEMO) --fractions $(PCTS) \
	  $(if $(strip $(DEV_SEEDS)),--dev-seeds $(DEV_SEEDS))

# the files of this graph that the reports read, one path a line (demo/layout.py names them for the reports;
# tests/test_demo_layout.py checks that the two agree). e.g.  make -s layout DEMO=runs/science SCIENCE=1 SEEDS=3
.PHONY: layout
layout: ## print every file of the demo's graph that the reports read (vars: DEMO SEEDS SCIENCE LADDER_FRACTIONS)
	@printf '%s\n' $(CLIP_EVALS) $(patsubst %/eval.json,%/config.json,$(CLIP_EVALS)) $(FT_METRICS) $(SCORE_SUMMARIES) \
	  $(SCORES)/dr-100/per_caption.parquet $(ATTENTION) $(ATTENTION:.json=.png) $(if $(filter 1,$(SCIENCE)),$(ATTENTION_SEEDS) $(DEPTH_FLOOR)) \
	  $(LADDER_SUMMARIES) $(DRR_SUMMARIES) $(CONTROL_SUMMARIES) $(RAW)/manifest.json \
	  $(foreach f,basic clip dedup,$(FILTERS)/$(f).report/report.json) $(CURATED)/summary.json $(SYN)/summary.json \
	  $(DR_DEMO)/summary.json $(W)/truth.parquet $(TIMINGS)

# ---------------------------------------------------------------------------------------------
# make science: the demo's graph with SCIENCE=1 at a calibrated scale, 3 seeds, a 3-fraction ladder.
# SCI_* are its settings (see README/the science report for what they measured); SCI_SCALE=0.05 SCI_SEEDS=2 is the
# smallest graph (the slow test runs it). Uncalibrated knobs are plain variables: FT_EXTRA, FINETUNE_STEPS via SCALE.
SCI ?= runs/science
SCI_SCALE ?= 1
SCI_SEEDS ?= 3
SCI_FRACTIONS ?= 1.0 0.3 0.1
SCI_FT_EXTRA ?=
SCI_DEV_SEEDS ?=
SCI_CAPTIONER_VOCAB ?= $(CAPTIONER_VOCAB)
.PHONY: science
science: setup ## positive controls, MAE, reinforced rungs, MCi vs ViT, attention test, verdicts over 3 seeds -> runs/science/science.md (vars: SCI SCI_SCALE SCI_SEEDS SCI_FRACTIONS SCI_FT_EXTRA SCI_DEV_SEEDS SCI_CAPTIONER_VOCAB JOBS PORT)
	@OMP_NUM_THREADS=$(THREADS) $(MAKE) --no-print-directory -j$(JOBS) SCIENCE=1 DEMO=$(SCI) SCALE=$(SCI_SCALE) \
	  SEEDS=$(SCI_SEEDS) LADDER_FRACTIONS="$(SCI_FRACTIONS)" FT_EXTRA="$(SCI_FT_EXTRA)" DEV_SEEDS="$(SCI_DEV_SEEDS)" \
	  CAPTIONER_VOCAB=$(SCI_CAPTIONER_VOCAB) \
	  $(SCI)/science.md
	@echo "science: $(SCI)/science.md (every number's source in $(SCI)/science.json; the demo's report beside it)"
