"""A generation with vLLM's draft-model proposer (``scripts/draft_model_greedy.py``) in a fresh process: one
engine per configuration, as the draft-model tests need."""

import json

import stress
from result_script import run_result_script


def run_draft_model(model, draft, num_spec: int, config: dict | None = None, temperature: float = 0.0,
                    kv_blocks: int | None = None) -> dict:
    """The script's result: token ids, afterburner's counters, vLLM's spec-decode metrics, chains, AWRS text
    (``kv_blocks``: ``stress.py``'s batch in a cache of that many blocks)."""
    return run_result_script("draft_model_greedy.py", model, draft, num_spec, json.dumps(config or {}),
                             temperature, env=stress.env(kv_blocks))[0]
