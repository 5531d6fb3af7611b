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
POOL_BASE ?= 3000
CLEAN_BASE ?= 1000
POOL_SAMPLES := $(call scaled,$(POOL_BASE),300)
CLEAN_SAMPLES := $(call scaled,$(CLEAN_BASE),128)
# scenes per eval task (seg, depth, cls, retrieval; a quarter of each is validation); make science: SCI_EVAL_BASE
EVAL_BASE ?= 400
EVAL_SAMPLES := $(call scaled,$(EVAL_BASE),64)
# more qcap world flags, e.g. the palette: WORLD_ARGS="--colours red,yellow,blue --backgrounds grass,studio"
WORLD_ARGS ?=
# the captioner's samples seen at SCALE=1 (make science: SCI_CAPTIONER_SAMPLES)
CAPTIONER_BASE_SAMPLES ?= 4800
CAPTIONER_SAMPLES := $(call scaled,$(CAPTIONER_BASE_SAMPLES),256)
# the ladder's CLIPs: their image tower (CLIP_MODEL) and samples seen at SCALE=1 (CLIP_BASE); make science sets both
CLIP_MODEL ?= qcap-tiny-clip
CLIP_BASE ?= 9600
CLIP_SAMPLES := $(call scaled,$(CLIP_BASE),256)
# finetuning steps per dense task at SCALE=1 (make science: the calibrated SCI_SEG_BASE, SCI_DEPTH_BASE)
FT_BASE ?= 50
SEG_BASE ?= $(FT_BASE)
DEPTH_BASE ?= $(FT_BASE)
DET_BASE ?= $(FT_BASE)
FT_STEPS_seg := $(call scaled,$(SEG_BASE),8)
FT_STEPS_depth := $(call scaled,$(DEPTH_BASE),8)
FT_STEPS_det := $(call scaled,$(DET_BASE),8)
CLIP_TOP_FRACTION ?= 0.5
SEED_LIST := $(shell seq 0 $$(( $(SEEDS) - 1 )))
# the ladder: fractions of the DR set (make science: three of them), their folder suffixes in percent
LADDER_FRACTIONS ?= 1.0 0.1
PCTS := $(foreach f,$(LADDER_FRACTIONS),$(shell awk 'BEGIN { print $(f) * 100 }'))
RUNGS := $(foreach p,$(PCTS),datacomp-$(p) dr-$(p))
DR_FIELDS := text,syn_text
# finetuning knobs (the calibration's): extra flags for every qcap finetune, e.g. --freeze-backbone --image-size 96
FT_EXTRA ?=
# SCIENCE=1 (make science) adds the positive controls (oracle-100: the real 100% rung's images with the world's true
# descriptions; shapes-100: the same images with captions naming only their shapes, the segmentation classes;
# clean-100: the clean split's human captions), the MAE baseline, attention distance per seed, and the science
# report; 0 (make demo) is the demo's graph alone
SCIENCE ?= 0
CONTROL_RUNGS := $(if $(filter 1,$(SCIENCE)),oracle-100 shapes-100 clean-100)
# (SCIENCE=1) a ladder whose tower is not the ViT (make science's qcap-tiny-resnet10t) gets the ViT beside it on the
# 100% rungs (vit-datacomp-100, vit-dr-100, vit-random), at the MAE baseline's samples seen (VIT_BASE): MAE is a ViT,
# and the paper compares it with CLIP on the same ViT; attention distance (ViT heads only) reads the vit- pair
VIT_SIDE := $(if $(filter 1,$(SCIENCE)),$(filter-out qcap-tiny-clip,$(CLIP_MODEL)))
VIT_RUNGS := $(if $(VIT_SIDE),vit-datacomp-100 vit-dr-100)
VIT_BASE ?= $(CLIP_BASE)
VIT_SAMPLES := $(if $(VIT_SIDE),$(call scaled,$(VIT_BASE),256),$(CLIP_SAMPLES))
ATTN := $(if $(VIT_SIDE),vit-)
# the reinforced rung (DataCompDR's dataset reinforcement, MobileCLIP's DR loss): drr-P is dr-P with stored
# augmentations and the embeddings of a teacher CLIP trained on the clean split (qcap reinforce), pretrained with
# --distill-loss-weights at the same samples seen. make demo: drr-100 only (its 15 minutes); SCIENCE=1: none, or
# every fraction with DRR=1 (make science SCI_DRR=1: one more pretraining per fraction and seed)
DRR ?= 0
DRR_PCTS := $(if $(filter 1,$(SCIENCE)),$(if $(filter 1,$(DRR)),$(PCTS)),100)
DRR_RUNGS := $(foreach p,$(DRR_PCTS),drr-$(p))
# (SCIENCE=1, MCI=1) the backbone architecture: MobileCLIP's MCi (qcap-tiny-mci, a FastViT image tower) pretrained
# on the DR and real 100% rungs and a random-init MCi, beside the ladder's rows (5x the ViT's time per step)
MCI ?= 0
MCI_RUNGS := $(if $(filter 1,$(SCIENCE)),$(if $(filter 1,$(MCI)),mci-dr-100 mci-datacomp-100))
PRETRAINED := $(RUNGS) $(DRR_RUNGS) $(CONTROL_RUNGS) $(MCI_RUNGS) $(VIT_RUNGS)
BASELINES := random $(if $(filter 1,$(SCIENCE)),mae) $(if $(MCI_RUNGS),mci-random) $(if $(VIT_SIDE),vit-random)
# dense tasks each backbone is finetuned on; SCIENCE=1 DET=1 adds detection (Mask R-CNN on the world's COCO-layout
# eval/det), which the 15-minute demo leaves out
DET ?= 0
FT_TASKS := seg depth $(if $(filter 1,$(SCIENCE)),$(if $(filter 1,$(DET)),det))

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
	  --eval-samples $(EVAL_SAMPLES) --base-url http://127.0.0.1:$(PORT) $(if $(filter det,$(FT_TASKS)),--det-samples $(EVAL_SAMPLES)) \
	  $(WORLD_ARGS)

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
# CAPTIONER_ARCH: the captioner's config: qcap-tiny-coca (a ViT tower, the demo's) or qcap-tiny-coca-resnet10t (a
# resnet10t tower at 64 px, make science's: the ViT names the wrong shapes, README "make science")
CAPTIONER_VOCAB ?= 1
CAPTIONER_ARCH ?= qcap-tiny-coca
VOCAB := $(DEMO)/vocab
CAPTIONER_MODEL := $(if $(filter 1,$(CAPTIONER_VOCAB)),$(CAPTIONER_ARCH)-world,$(CAPTIONER_ARCH))
VOCAB_CONFIG := $(if $(filter 1,$(CAPTIONER_VOCAB)),$(VOCAB)/$(CAPTIONER_MODEL).json)
$(VOCAB)/$(CAPTIONER_ARCH)-world.json: $(W)/world.json
	@$(TIMED) vocab $(QCAP) fit-vocab --world $(W) --out $(VOCAB) --base $(CAPTIONER_ARCH)
$(CAPTIONER)/eval.json: $(W)/world.json $(VOCAB_CONFIG)
	@$(if $(VOCAB_CONFIG),QCAP_MODEL_CONFIGS=$(VOCAB_CONFIG)) $(TIMED) captioner $(QCAP) train \
	  --preset tiny-coca --model $(CAPTIONER_MODEL) --data $(W)/clean --out $(CAPTIONER) \
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

# 6b. (SCIENCE=1) positive controls: the same images with true captions (ORACLE_CAPTIONS per image: 1 = the one true
# description; 5 = the perfect captioner in DataCompDR's format), or with their shapes only; the clean split's captions
ORACLE_CAPTIONS ?= 5
$(LADDER_DEMO)/oracle-%/summary.json: $(LADDER_DEMO)/datacomp-%/summary.json
	@$(TIMED) control-rung $(QCAP) control-rung --kind oracle --shards $(LADDER_DEMO)/datacomp-$* --world $(W) --out $(@D) \
	  --num-captions $(ORACLE_CAPTIONS)
$(LADDER_DEMO)/shapes-%/summary.json: $(LADDER_DEMO)/datacomp-%/summary.json
	@$(TIMED) control-rung $(QCAP) control-rung --kind shapes --shards $(LADDER_DEMO)/datacomp-$* --world $(W) --out $(@D)
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
# (SCIENCE=1) MAE of the same ViT on the real rung's images, same batch, steps and samples seen as the ViT's CLIPs
# (VIT_SAMPLES: the ladder's own, or VIT_BASE when the ViT stands beside a CNN ladder)
$(CLIP)/mae-s%/eval.json: $(LADDER_SUMMARIES)
	@$(TIMED) pretrain-mae $(QCAP) mae --data $(LADDER_DEMO)/datacomp-100 --out $(@D) --seed $* \
	  --samples-seen $(VIT_SAMPLES) --resume
# the reinforced rungs: MobileCLIP's DR loss (0.25 CLIP + 0.75 distillation), the web and one synthetic caption per
# image as on dr-P (--dr-mode dual), a stored augmentation drawn per sample
$(CLIP)/drr-%/eval.json: $(LADDER_SUMMARIES)
	@$(TIMED) pretrain-drr $(QCAP) train --preset tiny --model $(CLIP_MODEL) --data $(LADDER_DEMO)/drr-$(firstword $(subst -s, ,$*)) \
	  --out $(@D) --distill-loss-weights 0.25 0.75 --dr-mode dual --caption-source dual \
	  --seed $(lastword $(subst -s, ,$*)) --samples-seen $(CLIP_SAMPLES) --eval-data $(W)/eval \
	  --retrieval-data $(W)/eval/retrieval --resume
# (SCIENCE=1) the MCi image tower on a rung, same recipe and samples seen as the ViT
$(CLIP)/mci-%/eval.json: $(LADDER_SUMMARIES)
	@$(TIMED) pretrain-mci $(QCAP) train --preset tiny --model qcap-tiny-mci --data $(LADDER_DEMO)/$(firstword $(subst -s, ,$*)) \
	  --out $(@D) --caption-source $(if $(filter dr-%,$*),dual,real) --seed $(lastword $(subst -s, ,$*)) \
	  --samples-seen $(CLIP_SAMPLES) --eval-data $(W)/eval --retrieval-data $(W)/eval/retrieval --resume
# (VIT_SIDE) the ViT beside the ladder's tower, on the same rungs, at the MAE baseline's samples seen
$(CLIP)/vit-%/eval.json: $(LADDER_SUMMARIES)
	@$(TIMED) pretrain-vit $(QCAP) train --preset tiny --model qcap-tiny-clip --data $(LADDER_DEMO)/$(firstword $(subst -s, ,$*)) \
	  --out $(@D) --caption-source $(if $(filter dr-%,$*),dual,real) --seed $(lastword $(subst -s, ,$*)) \
	  --samples-seen $(VIT_SAMPLES) --eval-data $(W)/eval --retrieval-data $(W)/eval/retrieval --resume
$(CLIP)/%/eval.json: $(LADDER_SUMMARIES)
	@$(TIMED) pretrain $(QCAP) train --preset tiny --model $(CLIP_MODEL) --data $(LADDER_DEMO)/$(firstword $(subst -s, ,$*)) --out $(@D) \
	  --caption-source $(if $(filter dr-%,$*),dual,real) --seed $(lastword $(subst -s, ,$*)) \
	  --samples-seen $(CLIP_SAMPLES) --eval-data $(W)/eval --retrieval-data $(W)/eval/retrieval --resume

# 8. dense-task transfer of every backbone and of a random-init one; caption quality; attention distance
FINETUNE_ARGS = --preset tiny --resume $(FT_EXTRA)
# random init of each tower: the ladder's (random), MCi's (mci-random), the ViT's beside a CNN ladder (vit-random)
define RANDOM_FINETUNE
$$(FT)/$(1)-s%/$(2)/metrics.json: $$(W)/world.json
	@$$(TIMED) finetune $$(QCAP) finetune $(2) --random $(3) --seed $$* --data $$(W)/eval/$(2) --out $$(@D) \
	  --steps $$(FT_STEPS_$(2)) $$(FINETUNE_ARGS)
endef
$(foreach t,seg depth det,$(eval $(call RANDOM_FINETUNE,random,$(t),$(CLIP_MODEL))) \
  $(eval $(call RANDOM_FINETUNE,mci-random,$(t),qcap-tiny-mci)) $(eval $(call RANDOM_FINETUNE,vit-random,$(t),qcap-tiny-clip)))
# every pretrained backbone (its checkpoint names its tower)
define FINETUNE
$$(FT)/%/$(1)/metrics.json: $$(CLIP)/%/eval.json
	@$$(TIMED) finetune $$(QCAP) finetune $(1) --checkpoint $$(CLIP)/$$* --seed $$(lastword $$(subst -s, ,$$*)) \
	  --data $$(W)/eval/$(1) --out $$(@D) --steps $$(FT_STEPS_$(1)) $$(FINETUNE_ARGS)
endef
$(foreach t,seg depth det,$(eval $(call FINETUNE,$(t))))

$(SCORES)/%/summary.json: $(LADDER_SUMMARIES)
	@$(TIMED) score-captions $(QCAP) score-captions --world $(W) --captions $(LADDER_DEMO)/$* \
	  --field $(if $(filter dr-%,$*),$(DR_FIELDS),text) --out $(@D)

# (ATTN=vit-: the ladder's tower has no attention heads) the ViT pair beside it
$(ATTENTION): $(CLIP)/$(ATTN)dr-100-s0/eval.json $(CLIP)/$(ATTN)datacomp-100-s0/eval.json
	@$(TIMED) attention $(QCAP) attention-distance --checkpoint $(CLIP)/$(ATTN)dr-100-s0 --label "$(if $(ATTN),ViT )DR 100%" \
	  --compare $(CLIP)/$(ATTN)datacomp-100-s0 --compare-label "$(if $(ATTN),ViT )real captions 100%" \
	  --images $(W)/eval/seg/images/validation --out $(@D)

$(DEMO)/attention/s%/attention_distance.json: $(CLIP)/$(ATTN)dr-100-s%/eval.json $(CLIP)/$(ATTN)datacomp-100-s%/eval.json
	@$(TIMED) attention $(QCAP) attention-distance --checkpoint $(CLIP)/$(ATTN)dr-100-s$* --label "$(if $(ATTN),ViT )DR 100%" \
	  --compare $(CLIP)/$(ATTN)datacomp-100-s$* --compare-label "$(if $(ATTN),ViT )real captions 100%" \
	  --images $(W)/eval/seg/images/validation --out $(@D)

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
# SCI_* are its settings at SCI_SCALE=1 (README, "make science", has the calibration that chose them): the ladder's
# tower is the CNN qcap-tiny-resnet10t (a ViT this small does not learn the world's shapes at this compute) at 76,800
# samples seen, with the ViT, MAE and the attention test beside it at SCI_VIT_BASE; seg finetunes 800 steps, depth
# 200; SCI_MCI=1, SCI_DRR=1, SCI_DET=1 add the MCi tower, the reinforced rungs, detection. SCI_SCALE=0.05
# SCI_SEEDS=2 is the smallest graph (the slow test runs it). FT_EXTRA: extra flags for every finetune.
# SCI_WORLD_ARGS: the world's palette, 3 colours and 2 backgrounds (with all 11 colours and 7 backgrounds no caption
# that describes a whole scene teaches the CNN the shapes at this compute; with these, 5 human-style captions per image
# do); the oracle rung writes 5 true captions per image (ORACLE_CAPTIONS). SCI_EVAL_BASE: 1,600 scenes per eval task
# (1,200 to finetune on, 400 to score): the same finetune steps cost the same, and a finetune seed moves the metrics
# less than on the demo's 300/100 (random-init seg mIoU 0.172/0.164 over two seeds against 0.161/0.191).
# SCI_CAPTIONER_ARCH, SCI_CAPTIONER_SAMPLES: the captioner is a CoCa with a resnet10t tower trained for 307,200 samples
# seen (56 minutes here beside another job): the premise (synthetic captions truer than the curated alt-text) holds there
# and not below it (fact F1 0.558 against 0.547; 0.450 at 153,600; the ViT captioner 0.158 at 38,400).
SCI ?= runs/science
SCI_SCALE ?= 1
SCI_SEEDS ?= 3
SCI_FRACTIONS ?= 1.0 0.3 0.1
SCI_MODEL ?= qcap-tiny-resnet10t
SCI_CLIP_BASE ?= 76800
SCI_VIT_BASE ?= 19200
SCI_POOL_BASE ?= 12000
SCI_CLEAN_BASE ?= 4000
SCI_SEG_BASE ?= 800
SCI_DEPTH_BASE ?= 200
SCI_MCI ?= 0
SCI_DRR ?= 0
SCI_DET ?= 0
SCI_FT_EXTRA ?=
SCI_DEV_SEEDS ?=
SCI_CAPTIONER_VOCAB ?= $(CAPTIONER_VOCAB)
SCI_CAPTIONER_ARCH ?= qcap-tiny-coca-resnet10t
SCI_CAPTIONER_SAMPLES ?= 307200
SCI_WORLD_ARGS ?= --colours red,yellow,blue --backgrounds grass,studio
SCI_EVAL_BASE ?= 1600
.PHONY: science
science: setup ## positive controls, MAE, attention test, DR verdicts over 3 seeds -> runs/science/science.md (vars: SCI SCI_SCALE SCI_SEEDS SCI_FRACTIONS SCI_MODEL SCI_CLIP_BASE SCI_VIT_BASE SCI_POOL_BASE SCI_CLEAN_BASE SCI_SEG_BASE SCI_DEPTH_BASE SCI_MCI SCI_DRR SCI_DET SCI_FT_EXTRA SCI_DEV_SEEDS SCI_CAPTIONER_VOCAB SCI_CAPTIONER_ARCH SCI_CAPTIONER_SAMPLES SCI_WORLD_ARGS SCI_EVAL_BASE JOBS PORT)
	@OMP_NUM_THREADS=$(THREADS) $(MAKE) --no-print-directory -j$(JOBS) SCIENCE=1 DEMO=$(SCI) SCALE=$(SCI_SCALE) \
	  SEEDS=$(SCI_SEEDS) LADDER_FRACTIONS="$(SCI_FRACTIONS)" FT_EXTRA="$(SCI_FT_EXTRA)" DEV_SEEDS="$(SCI_DEV_SEEDS)" \
	  CAPTIONER_VOCAB=$(SCI_CAPTIONER_VOCAB) CAPTIONER_ARCH=$(SCI_CAPTIONER_ARCH) \
	  CAPTIONER_BASE_SAMPLES=$(SCI_CAPTIONER_SAMPLES) CLIP_MODEL=$(SCI_MODEL) CLIP_BASE=$(SCI_CLIP_BASE) VIT_BASE=$(SCI_VIT_BASE) \
	  POOL_BASE=$(SCI_POOL_BASE) CLEAN_BASE=$(SCI_CLEAN_BASE) SEG_BASE=$(SCI_SEG_BASE) DEPTH_BASE=$(SCI_DEPTH_BASE) \
	  MCI=$(SCI_MCI) DRR=$(SCI_DRR) DET=$(SCI_DET) WORLD_ARGS="$(SCI_WORLD_ARGS)" EVAL_BASE=$(SCI_EVAL_BASE) \
	  $(SCI)/science.md
	@echo "science: $(SCI)/science.md (every number's source in $(SCI)/science.json; the demo's report beside it)"
