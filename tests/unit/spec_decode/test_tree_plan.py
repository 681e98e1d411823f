"""The tree planner (spec_decode/tree_plan.py): ranks, the measured tree, its expected acceptance (checked
against the greedy acceptance rule engines run), the shape choice, and ``tree: "measured"``."""

import pytest
import torch

from afterburner.spec_decode.acceptance import accept_tree
from afterburner.spec_decode.tree import build_tree
from afterburner.spec_decode.tree_choices import tree_paths
from afterburner.spec_decode.tree_plan import Acceptance, best_shape, candidate_ranks


def test_candidate_ranks_match_a_sort_and_ties_count_against_the_target():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, 100, generator=g)
    targets = torch.randint(0, 100, (3, 40), generator=g)
    ranks = candidate_ranks(logits, targets)
    order = logits.argsort(-1, descending=True)
    expected = (order == targets[..., None]).float().argmax(-1).T
    assert torch.equal(ranks, expected)
    tied = torch.zeros(1, 1, 5)
    assert candidate_ranks(tied, torch.tensor([[2]])).item() == 4  # every other token listed first
    with pytest.raises(ValueError, match=r"logits \[K, P, V\]"):
        candidate_ranks(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))


def _ranks(positions: int, depth: int, seed: int) -> torch.Tensor:
    """Skewed toward rank 0, as a drafter's are, with some ranks beyond any tree."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(positions, depth, generator=g).pow(3) * 14).long()


def test_measured_tree_is_prefix_closed_and_the_most_accepted_paths():
    acc = Acceptance.from_ranks(_ranks(3000, 3, seed=1), max_rank=10)
    for nodes in (1, 4, 8, 16, 30):
        tree = acc.tree(nodes)
        assert len(tree) == nodes
        assert all(p[:-1] in tree for p in tree if len(p) > 1)  # every node's parent is in the tree
        chosen = [acc.counts[tuple(p)] for p in tree]
        rest = [c for p, c in acc.counts.items() if list(p) not in tree]
        assert min(chosen) >= max(rest)  # no path left out was accepted more often than one kept
    assert acc.tree(1) == [[0]]
    assert all(len(p) <= 2 for p in acc.tree(12, max_depth=2))


def test_expected_acceptance_equals_the_greedy_rule_position_by_position():
    """Each held-out position replayed through ``accept_tree``: drafts are each depth's candidates at the
    tree's ranks, the target's token at depth d sits at the position's rank d (or outside the candidates),
    and the base's greedy choice after every node is the target's next token."""
    depth, topk, vocab = 3, 10, 64
    ranks = _ranks(400, depth, seed=2)
    acc = Acceptance.from_ranks(ranks, max_rank=topk)
    g = torch.Generator().manual_seed(3)
    for nodes in (1, 3, 8, 20):
        tree = build_tree(acc.tree(nodes), max_depth=depth)
        emitted = 0
        for row in ranks.tolist():
            candidates = [torch.randperm(vocab, generator=g)[:topk + 1] for _ in range(depth)]
            targets = [int(c[min(r, topk)]) for c, r in zip(candidates, row, strict=True)]  # rank >= topk: outside
            tokens = [0] + [int(candidates[len(p) - 1][p[-1]]) for p in tree.choices]
            logits = torch.zeros(tree.num_nodes, vocab)
            for n, path in enumerate(((),) + tree.choices):
                if len(path) < depth:
                    logits[n, targets[len(path)]] = 1.0
            emitted += accept_tree(tree, torch.tensor(tokens), logits, rule="lossless", temperature=0).length + 1
        assert acc.accepted_per_step([list(c) for c in tree.choices]) == pytest.approx(emitted / len(ranks))


def test_best_shape_weighs_acceptance_against_step_time():
    tokens = {0: 1.0, 1: 1.3, 4: 1.6, 8: 1.8}
    shape, rate = best_shape(tokens, {0: 50.0, 1: 55.0, 4: 75.0, 8: 100.0})
    assert shape == 1 and rate[0] == pytest.approx(20.0) and rate[1] == pytest.approx(1.3 / 0.055)
    assert best_shape(tokens, {0: 50.0, 1: 70.0, 4: 90.0})[0] == 0  # speculation that does not pay: none
    assert best_shape(tokens, {0: 50.0, 1: 51.0, 4: 52.0, 8: 53.0})[0] == 8  # verification nearly free
    with pytest.raises(ValueError, match="no shape"):
        best_shape({1: 1.2}, {3: 10.0})


def test_round_trip_and_the_measured_tree_setting():
    acc = Acceptance.from_ranks(_ranks(500, 3, seed=4))
    again = Acceptance.from_dict(acc.to_dict(nodes=64))
    assert again.tree(16) == acc.tree(16) and again.positions == 500
    assert tree_paths("measured", max_depth=3, num_drafts=6, measured=acc) == acc.tree(6)
    assert all(len(p) <= 2 for p in tree_paths("measured", max_depth=2, num_drafts=6, measured=acc))
    with pytest.raises(ValueError, match="afterburner train medusa"):
        tree_paths("measured", max_depth=3, num_drafts=4)
    with pytest.raises(ValueError, match="were ever accepted"):
        tree_paths("measured", max_depth=1, num_drafts=11, measured=acc)
