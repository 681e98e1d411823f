"""A token tree from a draft model's top-k, engine-free: the draft's candidates at each depth are its top-k
after its own greedy chain, the vectorised node layout equals the tree reference's, greedy decoding through
the tree is plain greedy decoding of the target, and a tree holding the chain accepts at least what the
chain accepts from the same state (strictly more somewhere on these prompts)."""

import pytest
import torch

from afterburner.spec_decode.acceptance import greedy_accept_nodes
from afterburner.spec_decode.draft.draft_tree import draft_topk, draft_tree_generate, flatten_candidates
from afterburner.spec_decode.medusa.reference import tree_verify
from afterburner.spec_decode.tree import build_tree, tree_candidates
from afterburner.spec_decode.tree_choices import chain, tree_paths
from support.medusa import greedy_tokens

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

NEW, DEPTH = 16, 4
TREE = build_tree(tree_paths("paper", max_depth=DEPTH, num_drafts=12), max_depth=DEPTH)
CHAIN = build_tree(chain(DEPTH), max_depth=DEPTH)


def test_candidates_are_the_drafts_topk_after_its_greedy_chain(target_and_layer_draft):
    _, draft, prompts = target_and_layer_draft
    top = draft_topk(draft, prompts[0], DEPTH, 5)
    assert top.shape == (DEPTH, 5)
    assert top[:, 0].tolist() == greedy_tokens(draft, prompts[0], DEPTH)
    for depth in range(DEPTH):
        ids = torch.cat([prompts[0], top[:depth, 0]])
        logits = draft(input_ids=ids[None]).logits[0, -1]
        assert top[depth].tolist() == logits.topk(5).indices.tolist()


@pytest.mark.parametrize("seed", range(3))
def test_the_vectorised_layout_equals_the_tree_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    topk = torch.randint(0, 1000, (3, DEPTH, TREE.topk), generator=generator)
    flat = flatten_candidates(topk, TREE)
    assert flat.shape == (3, TREE.num_nodes - 1)
    for row in range(3):
        assert flat[row].tolist() == tree_candidates(TREE, 7, topk[row])[1:].tolist()


def test_greedy_through_the_tree_is_plain_greedy(target_and_layer_draft):
    target, draft, prompts = target_and_layer_draft
    for prompt in prompts:
        expected = greedy_tokens(target, prompt, NEW)
        for tree in (TREE, CHAIN):
            decoded = draft_tree_generate(target, draft, tree, prompt, NEW)
            assert decoded.tokens == expected
            assert decoded.accepted and max(decoded.accepted) <= tree.depth


def test_a_tree_holding_the_chain_accepts_at_least_the_chain(target_and_layer_draft):
    target, draft, prompts = target_and_layer_draft
    gains = []
    for prompt in prompts:
        ids = torch.cat([prompt, torch.tensor(greedy_tokens(target, prompt, NEW))])
        for end in range(prompt.numel() + 1, ids.numel()):  # every state along the greedy continuation
            top = draft_topk(draft, ids[:end], DEPTH, TREE.topk)
            lengths = []
            for tree in (CHAIN, TREE):
                nodes = tree_candidates(tree, int(ids[end - 1]), top)
                logits, _ = tree_verify(target, ids[: end - 1], nodes, tree)
                lengths.append(greedy_accept_nodes(tree, nodes, logits).length)
            assert lengths[1] >= lengths[0]
            gains.append(lengths[1] - lengths[0])
    assert sum(gains) > 0, "the tree's extra nodes never helped: the siblings are not the draft's runners-up"


def test_sampling_runs_and_stays_within_the_budget(target_and_layer_draft):
    target, draft, prompts = target_and_layer_draft
    decoded = draft_tree_generate(target, draft, TREE, prompts[0], NEW, temperature=0.8,
                                  generator=torch.Generator().manual_seed(0))
    assert len(decoded.tokens) == NEW and all(0 <= a <= DEPTH for a in decoded.accepted)
