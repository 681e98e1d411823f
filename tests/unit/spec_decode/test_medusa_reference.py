"""The torch Medusa reference on a real Hugging Face Llama (the tiny model, float64): tree verification equals
causal forwards along each path, greedy Medusa decoding is token-for-token plain greedy decoding (several
prompts, the paper's tree cut to 3 heads and a chain), and the sampling rules run through the loop. Heads
are untrained (identity blocks on the shared lm_head: every head proposes the base model's own top-k),
which acceptance does not need to be right, only to be fast. The same on SmolLM2:
tests/quality/test_medusa_smollm2.py."""

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from afterburner.spec_decode.acceptance import rejection_accept, typical_accept
from afterburner.spec_decode.medusa.reference import causal_forward, medusa_generate, tree_verify
from afterburner.spec_decode.tree import build_tree
from afterburner.spec_decode.tree_choices import MC_SIM_7B_63, chain
from support.medusa import greedy_tokens, untrained_heads

HEADS = 3
PAPER_3 = build_tree([c for c in MC_SIM_7B_63 if len(c) <= HEADS], max_depth=HEADS)  # 45 nodes, top-10
CHAIN_3 = build_tree(chain(HEADS), max_depth=HEADS)
NEW_TOKENS = 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()


def _prompt(seed, length):
    return torch.randint(3, 2048, (length,), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_tree_verification_equals_causal_forward_along_each_path(tiny):
    context, nodes = _prompt(0, 9), _prompt(1, PAPER_3.num_nodes)
    node_logits, node_hidden = tree_verify(tiny, context, nodes, PAPER_3)
    for row in PAPER_3.retrieve_indices.tolist():
        path = [n for n in row if n >= 0]
        logits, hidden = causal_forward(tiny, torch.cat([context, nodes[path]]))
        torch.testing.assert_close(node_logits[path], logits[9:], rtol=0, atol=1e-10)  # float64
        torch.testing.assert_close(node_hidden[path], hidden[9:], rtol=0, atol=1e-10)
    assert torch.equal(causal_forward(tiny, context)[0], tiny(context[None]).logits[0])


@pytest.mark.parametrize("tree", [PAPER_3, CHAIN_3], ids=["paper-3-heads", "chain-3"])
@pytest.mark.parametrize("seed, length", [(0, 2), (1, 7), (2, 16)])
def test_greedy_medusa_is_greedy_decoding(tiny, tree, seed, length):
    prompt = _prompt(seed, length)
    out = medusa_generate(tiny, untrained_heads(tiny, HEADS), tree, prompt, max_new_tokens=NEW_TOKENS)
    assert out.tokens == greedy_tokens(tiny, prompt, NEW_TOKENS)
    assert all(0 <= n <= tree.depth for n in out.accepted_lengths)
    assert sum(n + 1 for n in out.accepted_lengths) >= NEW_TOKENS > sum(n + 1 for n in out.accepted_lengths[:-1])


def test_the_paper_tree_accepts_drafts_with_untrained_heads(tiny):
    """Top-10 alternatives per head catch the tiny model's loops: more than one token per step."""
    out = medusa_generate(tiny, untrained_heads(tiny, HEADS), PAPER_3, _prompt(1, 7), max_new_tokens=NEW_TOKENS)
    assert len(out.accepted_lengths) < NEW_TOKENS and max(out.accepted_lengths) >= 2


def test_typical_acceptance_at_temperature_zero(tiny):
    prompt, heads = _prompt(3, 5), untrained_heads(tiny, HEADS)
    greedy = greedy_tokens(tiny, prompt, NEW_TOKENS)
    typical = functools.partial(typical_accept, temperature=0.0)
    assert medusa_generate(tiny, heads, PAPER_3, prompt, max_new_tokens=NEW_TOKENS, accept=typical).tokens == greedy
    never = functools.partial(typical_accept, temperature=0.0, epsilon=1.0, delta=float("inf"))
    out = medusa_generate(tiny, heads, PAPER_3, prompt, max_new_tokens=NEW_TOKENS, accept=never)
    assert out.tokens == greedy and out.accepted_lengths == [0] * NEW_TOKENS  # plain decoding, one by one


@pytest.mark.parametrize("rule", [rejection_accept, typical_accept])
def test_sampling_rules_run_through_the_loop_reproducibly(tiny, rule):
    def run():
        accept = functools.partial(rule, temperature=0.8, generator=torch.Generator().manual_seed(5))
        heads = untrained_heads(tiny, HEADS)
        return medusa_generate(tiny, heads, PAPER_3, _prompt(4, 6), max_new_tokens=12, accept=accept)

    first = run()
    assert len(first.tokens) == 12 and first == run()


def test_eos_stops_generation(tiny):
    prompt = _prompt(1, 7)
    greedy = greedy_tokens(tiny, prompt, NEW_TOKENS)
    eos = greedy[5]
    out = medusa_generate(tiny, untrained_heads(tiny, HEADS), PAPER_3, prompt, max_new_tokens=NEW_TOKENS,
                          eos_token_id=eos)
    assert out.tokens == greedy[: greedy.index(eos) + 1]


def test_one_token_prompt_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match=">= 2 tokens"):
        medusa_generate(tiny, untrained_heads(tiny, HEADS), CHAIN_3, torch.tensor([5]), max_new_tokens=4)
