"""Which methods compose in one vLLM engine (``plugins/vllm/composition.py``): pairings that do not work
yet stop startup with one line naming the pair (engine-free: ``test_composition_startup.py``); the
pairings that do work are served exactly (local-linear attention with a chain proposer, the micro-step
drafter, Medusa's chain, vLLM's draft model, n-gram proposer or EAGLE-3: speculative greedy output equals
non-speculative greedy output under the same local-linear model; sparse selection inside their
verification steps, chains of every proposer above and token trees of the micro-step drafter, Medusa and
the draft model, token-identical at a full budget, tree rows over the chosen blocks:
``test_compact_decode.py``; the token selectors, squeezed and sparse pages, inside chains and trees,
token-identical when they keep every key)."""

import json

import pytest
import torch
from result_script import run_result_script
from transformers import AutoModelForCausalLM

from afterburner.plugins.config import ConfigError
from afterburner.spec_decode.draft.derive import derive_draft
from afterburner.spec_decode.eagle3.drafter import Eagle3Drafter
from afterburner.spec_decode.eagle3.folder import save_eagle3
from afterburner.spec_decode.hamburger.checkpoint import save_drafter
from afterburner.spec_decode.hamburger.drafter import DrafterConfig, MicroStepDrafter
from afterburner.spec_decode.hamburger.train import drafter_config_for
from afterburner.spec_decode.medusa.checkpoint import save_heads
from afterburner.spec_decode.medusa.heads import HeadsConfig, MedusaHeads


@pytest.fixture(scope="module")
def proposers(tiny_model, tmp_path_factory):
    base = AutoModelForCausalLM.from_pretrained(tiny_model).config
    folder = tmp_path_factory.mktemp("proposers")
    torch.manual_seed(0)
    drafter = save_drafter(folder / "drafter", MicroStepDrafter(DrafterConfig(
        base_hidden_size=base.hidden_size, vocab_size=base.vocab_size, feature_layers=(1,), hidden_size=128,
        num_heads=2, num_kv_heads=2, head_dim=64, intermediate_size=256)))
    heads = save_heads(MedusaHeads(HeadsConfig(base.hidden_size, base.vocab_size, num_heads=3)), folder / "heads")
    eagle3 = save_eagle3(folder / "eagle3", Eagle3Drafter(drafter_config_for(base, (1,))), max_position_embeddings=1024)
    draft = derive_draft(tiny_model, folder / "int4", int4=True)
    return {"hamburger": str(drafter), "medusa": str(heads), "eagle3": str(eagle3), "draft-model": str(draft),
            "ngram": "-"}


def _engine_config(model, spec, section):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), speculative_config=spec, enforce_eager=True,
                      additional_config={"afterburner": section}).create_engine_config()


TREE = {"speculative": {"tree": "paper"}}


def test_local_linear_with_a_medusa_tree_is_refused_and_with_a_chain_starts(tiny_model, proposers):
    spec = {"method": "medusa", "model": proposers["medusa"], "num_speculative_tokens": 2}
    lla = {"method": "local_linear"}
    with pytest.raises(ConfigError, match="with a token tree .*medusa.* set speculative.tree to \"chain\""):
        _engine_config(tiny_model, spec, {"attention": lla, "speculative": {"tree": "paper"}})
    config = _engine_config(tiny_model, spec, {"attention": lla, "speculative": {"tree": "chain"}})
    assert config.speculative_config.method == "medusa"


# the chain proposers a test runs: their script, drafts per step and the afterburner settings each needs
CHAINS = {"hamburger": ("hamburger_greedy.py", 3, {"speculative": {"stop_threshold": 0.0}}),
          "eagle3": ("eagle3_greedy.py", 3, {}),
          "medusa": ("medusa_greedy.py", 3, {"speculative": {"tree": "chain"}}),
          "draft-model": ("draft_model_greedy.py", 3, {}),
          "ngram": ("ngram_greedy.py", 3, {})}
# and token trees (the micro-step drafter's from its first micro-steps, Medusa's heads' top-k, the draft model's
# top-k): verification rows in tree order
VERIFIERS = {**CHAINS, "hamburger-tree": ("hamburger_greedy.py", 3, TREE), "medusa-tree": ("medusa_greedy.py", 6, TREE),
             "draft-model-tree": ("draft_model_greedy.py", 4, TREE)}


def _run(model, proposers, method, section, speculative=True, request_args=None):
    """The method's script on the shared batch (each request with ``request_args``); without
    ``speculative``, the same engine with no proposer."""
    script, num_spec, own = VERIFIERS[method]
    folder = proposers[method.removesuffix("-tree")]
    return run_result_script(script, model, folder, num_spec if speculative else 0, json.dumps({**own, **section}),
                             0.0, json.dumps(request_args))[0]


@pytest.mark.parametrize("method", sorted(CHAINS))
def test_local_linear_with_a_chain_proposer_is_lossless(tiny_model, proposers, method):
    """With EAGLE-3, vLLM's drafter layer runs afterburner's local-linear attention too (drafts change, the
    output must not)."""
    section = {"attention": {"method": "local_linear", "local_linear": {"lam": 1.0}}}
    plain = _run(tiny_model, proposers, method, section, speculative=False)
    speculative = _run(tiny_model, proposers, method, section)
    assert speculative["metrics"]["vllm:spec_decode_num_drafts"] > 0
    assert speculative["tokens"] == plain["tokens"]
    # an AWRS request on either engine: constrained (verified by AWRS's own draws beside the drafter)
    assert speculative["awrs"] in ("yes", "no") and plain["awrs"] in ("yes", "no")


@pytest.fixture(scope="module")
def dense(tiny_model, proposers):
    """The batch without speculation or afterburner attention: every proposer script runs the same engine."""
    return _run(tiny_model, proposers, "hamburger", {}, speculative=False)

SPARSE = {"method": "sparse", "sparse": {"budget_ratio": 0.25, "dense_below_tokens": 64, "dense_layers": 0}}


@pytest.mark.parametrize("method", sorted(VERIFIERS))
def test_sparse_selects_inside_a_proposers_verification_steps(tiny_model, proposers, dense, method):
    full = {"attention": {**SPARSE, "sparse": {**SPARSE["sparse"], "token_budget": 100_000}}}
    assert _run(tiny_model, proposers, method, full)["tokens"] == dense["tokens"]
    sparse = _run(tiny_model, proposers, method, {"attention": SPARSE})
    assert sparse["awrs"] == dense["awrs"] and dense["awrs"] in ("yes", "no")  # all three methods in one engine
    counts = sparse["attention"]
    assert counts["selective_verify_rows"] > 0, counts
    assert counts["kv_bytes_read"] < counts["kv_bytes_dense"]
    assert sparse["metrics"]["vllm:spec_decode_num_drafts"] > 0
    assert [len(t) for t in sparse["tokens"]] == [len(t) for t in dense["tokens"]]


# token selectors: one choice per verifying row, made with its first query ("keep all": the setting that reads
# every key); tree rows read the chosen keys and their own path
_SQUEEZED = {"dense_below_tokens": 64, "dense_layers": 0, "observation_window": 16}
SELECTORS = {
    "squeezed": ({"method": "squeezed", "squeezed": {**_SQUEEZED, "read_unit": "token"}}, {"threshold_quantile": 0.0},
                 {"threshold_quantile": 0.75}),
    # in blocks (vLLM's default): verification rows by the token lookup, single-query rows through the copies
    "squeezed-blocks": ({"method": "squeezed", "squeezed": {**_SQUEEZED, "read_unit": "block"}},
                        {"threshold_quantile": 0.0, "budget_ratio": 1.0}, {"threshold_quantile": 0.75}),
    "sparse-pages": ({"method": "sparse", "sparse": {**SPARSE["sparse"], "read_unit": "page"}},
                     {"token_budget": 100_000}, {}),
}


@pytest.mark.parametrize("selector, method", [("squeezed", "hamburger"), ("squeezed", "draft-model"),
                                              ("squeezed", "hamburger-tree"), ("squeezed", "medusa-tree"),
                                              ("squeezed", "eagle3"), ("squeezed", "ngram"),
                                              ("squeezed-blocks", "ngram"), ("squeezed-blocks", "hamburger"),
                                              ("sparse-pages", "medusa"), ("sparse-pages", "medusa-tree"),
                                              ("sparse-pages", "draft-model-tree")])
def test_token_selectors_select_inside_verification_steps(tiny_model, proposers, dense, selector, method):
    base, keep_all, fraction = SELECTORS[selector]
    name = base["method"]

    def attention(extra):
        return {"attention": {**base, name: {**base[name], **extra}}}

    full = _run(tiny_model, proposers, method, attention(keep_all))
    assert full["tokens"] == dense["tokens"]
    assert full["attention"]["selective_verify_rows"] > 0, full["attention"]
    assert full["attention"]["tokens_read"] == full["attention"]["tokens_in_context"]
    assert full["attention"]["native_op_rows"] > 0 == full["attention"]["torch_op_rows"], full["attention"]
    if selector == "squeezed-blocks" and method == "ngram":  # steps without a match decode one query: the copies
        assert full["attention"]["compact_rows"] > 0, full["attention"]
    chosen = _run(tiny_model, proposers, method, attention(fraction))
    assert chosen["awrs"] == dense["awrs"] and dense["awrs"] in ("yes", "no")  # all three methods in one engine
    counts = chosen["attention"]
    assert counts["selective_verify_rows"] > 0, counts
    assert 0 < counts["tokens_read"] < 0.8 * counts["tokens_in_context"], counts
    assert chosen["metrics"]["vllm:spec_decode_num_drafts"] > 0
    assert [len(t) for t in chosen["tokens"]] == [len(t) for t in dense["tokens"]]


def test_speckv_selects_inside_a_chains_verification_steps(tiny_model, proposers, dense, tmp_path):
    """SpecKV's per-request choice (the draft's, per layer and kv head) read by every query of the long
    request's verification rows; a capacity above every prompt is plain."""
    draft = derive_draft(tiny_model, tmp_path / "draft-l1", layers=1)
    section = {"attention": {"method": "speckv", "speckv": {"draft": str(draft), "window": 16, "lookahead": 4}}}
    full = _run(tiny_model, proposers, "draft-model", section, request_args={"speckv_capacity": 4096})
    assert full["tokens"] == dense["tokens"]
    chosen = _run(tiny_model, proposers, "draft-model", section, request_args={"speckv_capacity": 48})
    counts = chosen["attention"]
    assert counts["selective_verify_rows"] > 0, counts
    assert 0 < counts["tokens_read"] < counts["tokens_in_context"], counts
    assert chosen["metrics"]["vllm:spec_decode_num_drafts"] > 0
    assert [len(t) for t in chosen["tokens"]] == [len(t) for t in dense["tokens"]]
