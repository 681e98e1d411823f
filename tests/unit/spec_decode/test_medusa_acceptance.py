"""Medusa acceptance rules on one verified tree: greedy from node logits, typical acceptance against
hand-computed thresholds, and rejection acceptance sampling exactly the base model (chi-square).

Seeds are fixed, so the statistical tests are deterministic; the tolerance (p > 0.001) is one that a
correct sampler passes for most seeds, and the same test rejects typical acceptance (p < 1e-6), which is
not lossless: the test can tell."""

import math

import pytest
import torch

from afterburner.spec_decode.acceptance import (
    TYPICAL_DELTA,
    TYPICAL_EPSILON,
    accepted_nodes,
    base_probs,
    greedy_accept,
    greedy_accept_nodes,
    rejection_accept,
    typical_accept,
)
from afterburner.spec_decode.tree import build_tree, paths_tokens, tree_candidates
from support.stats import chi_square_p

# nodes: 0 root, 1 (0), 2 (1), 3 (0,0), 4 (0,1), 5 (1,0); paths [0,1,3], [0,1,4], [0,2,5]
SMALL = build_tree([[0], [1], [0, 0], [0, 1], [1, 0]], max_depth=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py


def _logits(rows, temperature=1.0):
    """Logits whose softmax(. / temperature) is each row of probabilities."""
    return torch.tensor(rows, dtype=torch.float64).log() * temperature


def _random_case(seed, tree=SMALL, vocab=6):
    """Drafts as heads give them (distinct siblings) and random node logits, each node's argmax moved onto
    one of its children's drafts half the time, so that paths get accepted."""
    gen = torch.Generator().manual_seed(seed)
    head_topk = torch.stack([torch.randperm(vocab, generator=gen)[: tree.topk] for _ in range(tree.depth)])
    tokens = tree_candidates(tree, 0, head_topk)
    logits = torch.randn(tree.num_nodes, vocab, generator=gen, dtype=torch.float64)
    for i, path in enumerate(tree.choices, start=1):
        parent = tree.choices.index(path[:-1]) + 1 if len(path) > 1 else 0
        if torch.rand((), generator=gen) < 0.5:
            logits[parent, tokens[i]] += 5.0
    return tokens, logits


def test_greedy_accept_nodes_reads_targets_from_node_logits():
    tokens = torch.tensor([7, 1, 3, 2, 0, 1])
    logits = torch.full((6, 4), 0.0)
    for node, best in enumerate([1, 0, 1, 3, 2, 3]):  # greedy token after each node
        logits[node, best] = 1.0
    # [0,1,3]: 1 ok, 2 != 0; [0,1,4]: 1 ok, 0 ok, bonus 2; [0,2,5]: 3 != 1
    accepted = greedy_accept_nodes(SMALL, tokens, logits)
    assert (accepted.path, accepted.length, accepted.tokens) == (1, 2, [1, 0, 2])
    assert accepted_nodes(SMALL, accepted).tolist() == [0, 1, 4]
    logits[1] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # node 1's greedy token is now 2 = node 3's draft
    accepted = greedy_accept_nodes(SMALL, tokens, logits)
    assert (accepted.path, accepted.length, accepted.tokens) == (0, 2, [1, 2, 3])
    assert accepted_nodes(SMALL, accepted).tolist() == [0, 1, 3]


def test_typical_defaults_are_the_reference_implementations():
    assert (TYPICAL_EPSILON, TYPICAL_DELTA) == (0.09, 0.3)


def test_typical_accept_against_hand_computed_thresholds():
    # Thresholds min(0.09, 0.3 exp(-H)):
    #   root  p = [.4, .3, .213, .087]  H = 1.2695  0.3 e^-H = 0.0843 -> 0.0843 (the entropy term binds)
    #   node1 p = [.05, .05, .85, .05]  H = 0.5875  0.3 e^-H = 0.1667 -> 0.09
    #   node2 p = [.05, .9, .03, .02]   H = 0.4280  0.3 e^-H = 0.1959 -> 0.09
    rows = [[.4, .3, .213, .087], [.05, .05, .85, .05], [.05, .9, .03, .02],
            [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    tokens = torch.tensor([5, 3, 1, 0, 2, 1])
    # drafts: node1 3 (.087 > .0843 yes), node2 1 (.3 yes), node3 0 (.05 no), node4 2 (.85 yes), node5 1 (.9 yes)
    # paths [0,1,3] 1 accepted; [0,1,4] 2, log(.087 * .85); [0,2,5] 2, log(.3 * .9): the likelier one wins
    gen = torch.Generator().manual_seed(0)
    accepted = typical_accept(SMALL, tokens, _logits(rows, 0.5), temperature=0.5, generator=gen)
    assert (accepted.path, accepted.length, accepted.tokens) == (2, 2, [1, 1, 2])  # bonus: node 5's one-hot

    tokens[5] = 0  # node 5's draft now .05: rejected, so [0,1,4] is the only path with 2
    accepted = typical_accept(SMALL, tokens, _logits(rows), temperature=1.0, generator=gen)
    assert (accepted.path, accepted.length, accepted.tokens) == (1, 2, [3, 2, 3])
    # delta 0.35 lifts the root's threshold to min(.09, .0983) = .09: node 1's .087 is now rejected
    accepted = typical_accept(SMALL, tokens, _logits(rows), temperature=1.0, delta=0.35, generator=gen)
    assert (accepted.path, accepted.length, accepted.tokens[:1]) == (2, 1, [1])


@pytest.mark.parametrize("seed", range(5))
def test_typical_and_rejection_at_temperature_zero_are_greedy(seed):
    tokens, logits = _random_case(seed)
    greedy = greedy_accept_nodes(SMALL, tokens, logits)
    assert typical_accept(SMALL, tokens, logits, temperature=0.0) == greedy
    assert rejection_accept(SMALL, tokens, logits, temperature=0.0) == greedy
    reference = greedy_accept(paths_tokens(SMALL, tokens), paths_tokens(SMALL, logits.argmax(-1)))
    assert greedy == reference


@pytest.mark.parametrize("seed", range(3))
def test_typical_thresholds_at_the_extremes(seed):
    tokens, logits = _random_case(seed)
    gen = torch.Generator().manual_seed(seed)
    # a threshold of 1 accepts nothing: one token per step, sampled from the root's distribution
    nothing = typical_accept(SMALL, tokens, logits, temperature=1.0, epsilon=1.0, delta=math.inf, generator=gen)
    assert (nothing.path, nothing.length, len(nothing.tokens)) == (0, 0, 1)
    assert typical_accept(SMALL, tokens, logits, temperature=0.0, epsilon=1.0, delta=math.inf).tokens == [
        int(logits[0].argmax())]
    # a threshold of 0 accepts every draft: the likeliest full path
    everything = typical_accept(SMALL, tokens, logits, temperature=1.0, epsilon=0.0, generator=gen)
    probs = base_probs(logits, 1.0)
    likelihood = [probs[r[0], tokens[r[1]]] * probs[r[1], tokens[r[2]]] for r in SMALL.retrieve_indices.tolist()]
    assert (everything.path, everything.length) == (int(torch.tensor(likelihood).argmax()), 2)


# A synthetic base model with known distributions: a second-order Markov chain over VOCAB tokens.
VOCAB = 3
TABLE = torch.randn(VOCAB, VOCAB, VOCAB, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 1.5
DRAFTER = torch.randn(2, VOCAB, VOCAB, generator=torch.Generator().manual_seed(12))  # head k: last token -> logits


def _parents(tree):
    return torch.tensor([0] + [tree.choices.index(c[:-1]) + 1 if len(c) > 1 else 0 for c in tree.choices])


def _step(rule, context, tree, parents, gen, drafts):
    """One Medusa step on the Markov model from context (>= 2 tokens, the last one the root): the tokens
    it emits."""
    root = context[-1]
    if drafts == "heads":
        head_topk = DRAFTER[:, root].topk(tree.topk, dim=-1).indices
    else:  # arbitrary drafts, duplicate siblings included
        head_topk = torch.randint(VOCAB, (2, tree.topk), generator=gen)
    tokens = tree_candidates(tree, root, head_topk)
    before = tokens[parents]  # the token before each node's own on its path
    before[0] = context[-2]
    return rule(tree, tokens, TABLE[before, tokens], generator=gen).tokens


def _first_two(rule, tree, n, seed, drafts):
    gen = torch.Generator().manual_seed(seed)
    parents = _parents(tree)
    counts = torch.zeros(VOCAB * VOCAB, dtype=torch.float64)
    for _ in range(n):
        context = [0, 1]
        while len(context) < 4:
            context += _step(rule, context, tree, parents, gen, drafts)
        counts[context[2] * VOCAB + context[3]] += 1
    return counts


@pytest.mark.parametrize("temperature, drafts, seed", [(1.0, "heads", 0), (0.6, "random", 1)])
def test_rejection_accept_samples_the_base_model_token_by_token(temperature, drafts, seed):
    """Joint law of the first two emitted tokens after context (0, 1): p(x1 | 0, 1) p(x2 | 1, x1), whether
    both came from one step (drafts accepted) or from two."""
    tree = build_tree([[0], [1], [0, 0], [0, 1], [1, 0], [1, 1]], max_depth=2)
    probs = base_probs(TABLE, temperature)
    expected = (probs[0, 1][:, None] * probs[1]).flatten()  # [x1 * VOCAB + x2]

    def lossless(tree, tokens, logits, generator):
        return rejection_accept(tree, tokens, logits, temperature=temperature, generator=generator)

    def typical(tree, tokens, logits, generator):
        return typical_accept(tree, tokens, logits, temperature=temperature, generator=generator)

    n = 3000
    assert chi_square_p(_first_two(lossless, tree, n, seed, drafts), expected) > 1e-3
    assert chi_square_p(_first_two(typical, tree, n, seed, drafts), expected) < 1e-6
