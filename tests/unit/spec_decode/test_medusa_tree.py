"""Medusa tree buffers against a hand-built tree and the paper's default tree, tree attention equal to
causal attention along each path, and greedy acceptance."""

import pytest
import torch

from afterburner.spec_decode.acceptance import greedy_accept
from afterburner.spec_decode.tree import build_tree, paths_tokens, tree_candidates
from afterburner.spec_decode.tree_choices import MC_SIM_7B_63, chain
from support.attention import sdpa

SMALL = [[1], [0], [0, 1], [0, 0], [1, 0]]  # given out of order on purpose


def test_hand_built_tree():
    tree = build_tree(SMALL, max_depth=2)
    # node order: root, (0), (1), (0,0), (0,1), (1,0)
    assert tree.choices == ((0,), (1,), (0, 0), (0, 1), (1, 0))
    assert tree.attn_mask.int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ]
    assert tree.position_offsets.tolist() == [0, 1, 1, 2, 2, 2]
    assert tree.topk == 2
    assert tree.candidate_index.tolist() == [0, 1, 2, 3, 4, 3]
    assert tree.retrieve_indices.tolist() == [[0, 1, 3], [0, 1, 4], [0, 2, 5]]
    head_topk = torch.tensor([[10, 11], [20, 21]])
    nodes = tree_candidates(tree, 7, head_topk)
    assert nodes.tolist() == [7, 10, 11, 20, 21, 20]
    assert paths_tokens(tree, nodes).tolist() == [[7, 10, 20], [7, 10, 21], [7, 11, 20]]


def test_paper_default_tree():
    tree = build_tree(MC_SIM_7B_63, max_depth=4)
    assert tree.num_nodes == 64 and tree.depth == 4 and tree.topk == 10
    for i, path in enumerate(tree.choices, start=1):
        for j, other in enumerate(tree.choices, start=1):
            is_ancestor = len(other) <= len(path) and path[: len(other)] == other
            assert bool(tree.attn_mask[i, j]) == is_ancestor
    for row in tree.retrieve_indices.tolist():
        nodes = [n for n in row if n >= 0]
        assert nodes[0] == 0 and [tree.position_offsets[n].item() for n in nodes] == list(range(len(nodes)))
        for parent, child in zip(nodes[1:], nodes[2:], strict=False):
            assert tree.choices[child - 1][:-1] == tree.choices[parent - 1]
    assert len(tree.retrieve_indices) == sum(
        1 for c in tree.choices if not any(len(o) > len(c) and o[: len(c)] == c for o in tree.choices))


def test_chain_tree_is_one_path():
    tree = build_tree(chain(3), max_depth=3)
    assert tree.retrieve_indices.tolist() == [[0, 1, 2, 3]]
    assert torch.equal(tree.attn_mask, torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("choices, heads, topk, message", [
    ([[0], [0, 0], [0, 0, 0]], 2, None, "3 deep but the drafter reaches only depth 2"),
    ([[0], [0, 1, 0]], 3, None, r"path \[0, 1\] is missing"),
    ([[0], [5]], 1, 4, "rank 5 but the drafter keeps only top-4"),
    ([], 1, None, "at least one"),
])
def test_bad_trees_are_clear_errors(choices, heads, topk, message):
    with pytest.raises(ValueError, match=message):
        build_tree(choices, max_depth=heads, topk=topk)


def _attention(q, k, v, mask):
    """One head, unscaled, each query reading the keys its row of ``mask`` allows: [n, D]."""
    return sdpa(q[:, None], k[:, None], v[:, None], scale=1.0, causal=False, mask=mask)[:, 0]


@pytest.mark.parametrize("seed", range(3))
def test_tree_attention_equals_causal_attention_along_each_path(seed):
    """The point of the mask: each node sees exactly the sequence root -> ... -> itself."""
    tree = build_tree(MC_SIM_7B_63, max_depth=4)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(tree.num_nodes, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    tree_out = _attention(q, k, v, tree.attn_mask)
    for row in tree.retrieve_indices.tolist():
        path = [n for n in row if n >= 0]
        causal = torch.ones(len(path), len(path), dtype=torch.bool).tril()
        expected = _attention(q[path], k[path], v[path], causal)
        assert torch.allclose(tree_out[path], expected)


def test_greedy_accept_takes_the_longest_matching_path_and_the_bonus_token():
    paths = torch.tensor([[7, 10, 20], [7, 10, 21], [7, 11, 20]])
    target = torch.tensor([[10, 99, 5], [10, 21, 6], [12, 0, 0]])
    accepted = greedy_accept(paths, target)
    assert (accepted.path, accepted.length, accepted.tokens) == (1, 2, [10, 21, 6])
    nothing = greedy_accept(paths, torch.tensor([[1, 1, 1]] * 3))
    assert (nothing.path, nothing.length, nothing.tokens) == (0, 0, [1])
    padded = greedy_accept(torch.tensor([[7, 10, -1]]), torch.tensor([[10, 3, -1]]))
    assert (padded.length, padded.tokens) == (1, [10, 3])
