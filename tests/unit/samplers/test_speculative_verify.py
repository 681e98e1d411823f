"""AWRS as the verifier of a speculative chain or token tree (``samplers.speculative``) against AWRS alone,
on a toy target whose logits depend on the whole prefix: the emitted sequence is the same token for token
(greedy, and sampled with the same seed: one draw of the generator per emitted token either way), the
sampled tokens at drafted positions follow the constrained softmax (chi-square), drafts
are accepted when they fit, a draft the constraint forbids is never accepted, and a tree's kept nodes are
the path its emitted drafts took."""

import torch

from afterburner.samplers.speculative import allowed_drafts, verify_chain, verify_tree
from afterburner.spec_decode.tree import build_tree
from support.stats import chi_square_p

TREE = build_tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]], max_depth=3)

VOCAB, EOS = 12, 11


def target_logits(prefix: list[int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(hash(tuple(prefix)) % (2**31))
    return torch.randn(VOCAB, generator=generator) * 2


def allowed(prefix: list[int], token: int) -> bool:
    """No token twice in a row, no odd token after an odd one; EOS after 6 tokens."""
    if token == EOS:
        return len(prefix) >= 6
    return not prefix or (token != prefix[-1] and not (token % 2 and prefix[-1] % 2))


def sampler(temperature: float | None, seed: int):
    generator = torch.Generator().manual_seed(seed)

    def draw(logits: torch.Tensor, prefix: list[int]) -> int:
        mask = torch.tensor([allowed(prefix, t) for t in range(VOCAB)])
        masked = logits.masked_fill(~mask, float("-inf"))
        if temperature is None:
            return int(masked.argmax())
        return int(torch.multinomial(torch.softmax(masked / temperature, -1), 1, generator=generator))

    return draw


def alone(temperature, seed, length=16) -> list[int]:
    draw, out = sampler(temperature, seed), []
    while len(out) < length and (not out or out[-1] != EOS):
        out.append(draw(target_logits(out), out))
    return out


def trimmed(out: list[int], length: int) -> list[int]:
    """What AWRS alone emits within ``length`` tokens: a step may run past the length or its EOS."""
    out = out[:length]
    return out[: out.index(EOS) + 1] if EOS in out else out


def speculative(temperature, seed, drafter, length=16, cut=False) -> tuple[list[int], int]:
    draw, out, accepted = sampler(temperature, seed), [], 0
    while len(out) < length and (not out or out[-1] != EOS):
        drafts = drafter(out)
        if cut:  # what the engine does before verification
            drafts = drafts[:allowed_drafts(allowed, out, drafts)]
        logits = torch.stack([target_logits(out + drafts[:j]) for j in range(len(drafts) + 1)])
        step = verify_chain(draw, logits, out, drafts, EOS)
        accepted += len(step) - 1
        out += step
    return trimmed(out, length), accepted


def greedy_drafter(n):
    """Drafts the target's unconstrained argmax chain: often allowed, sometimes not."""
    def drafter(prefix):
        drafts = []
        for _ in range(n):
            drafts.append(int(target_logits(prefix + drafts).argmax()))
        return drafts
    return drafter


def test_greedy_output_equals_awrs_alone_and_drafts_are_accepted():
    for seed in range(5):
        expected = alone(None, seed)
        got, accepted = speculative(None, seed, greedy_drafter(3))
        assert got == expected
    assert accepted > 0


def test_seeded_sampling_equals_awrs_alone_token_for_token():
    total = 0
    for seed in range(20):
        got, accepted = speculative(1.0, seed, greedy_drafter(3))
        assert got == alone(1.0, seed)
        total += accepted
    assert total > 0


def masked_probs(prefix: list[int]) -> torch.Tensor:
    mask = torch.tensor([allowed(prefix, t) for t in range(VOCAB)])
    return torch.softmax(target_logits(prefix).masked_fill(~mask, float("-inf")), -1)


def test_sampled_tokens_at_drafted_positions_follow_the_constrained_softmax():
    """Chi-square over 3,000 seeds (p > 1e-3): the second emitted token, whose position carries a draft, is
    distributed as the constrained softmax given the first, averaged over the first; far from the
    unconstrained one (p < 1e-6)."""
    counts, accepted = torch.zeros(VOCAB), 0
    for seed in range(3000):
        got, step_accepted = speculative(1.0, 10_000 + seed, greedy_drafter(3), length=2)
        counts[got[1]] += 1
        accepted += step_accepted
    first = masked_probs([])
    expected = sum(first[t] * masked_probs([t]) for t in range(VOCAB))
    assert chi_square_p(counts, expected) > 1e-3
    unconstrained = torch.softmax(target_logits([]), -1)
    assert chi_square_p(counts, sum(unconstrained[t] * torch.softmax(target_logits([t]), -1)
                                    for t in range(VOCAB))) < 1e-6
    assert accepted > 0


def test_a_forbidden_draft_is_never_accepted():
    prefix = [2]
    drafts = [2, 4]  # 2 after 2 is forbidden
    logits = torch.full((3, VOCAB), -10.0)
    logits[:, 2] = 10.0  # the target loves the forbidden token
    step = verify_chain(sampler(None, 0), logits, prefix, drafts, EOS)
    assert len(step) == 1 and step[0] != 2 and allowed(prefix, step[0])


def tree_drafter(tree):
    """Node tokens from the target's unconstrained top-k at each node's parent path (a drafter as good as
    the target at ranking): deep paths often fit the constraint, some siblings do not."""
    def drafter(prefix):
        tokens, paths = [-1], {(): []}
        for path in tree.choices:
            parent = paths[path[:-1]]
            token = int(target_logits(prefix + parent).topk(path[-1] + 1).indices[-1])
            paths[path] = parent + [token]
            tokens.append(token)
        return tokens, [paths[()]] + [paths[p] for p in tree.choices]
    return drafter


def speculative_tree(temperature, seed, length=16) -> tuple[list[int], int]:
    draw, out, accepted, drafter = sampler(temperature, seed), [], 0, tree_drafter(TREE)
    while len(out) < length and (not out or out[-1] != EOS):
        tokens, node_paths = drafter(out)
        logits = torch.stack([target_logits(out + path) for path in node_paths])
        step, nodes = verify_tree(draw, TREE, tokens, logits, out, EOS)
        assert len(nodes) == len(step)  # root + one node per accepted draft
        assert [tokens[n] for n in nodes[1:]] == step[:-1]  # the kept nodes carry the accepted drafts
        assert all(TREE.attn_mask[b, a] for a, b in zip(nodes, nodes[1:], strict=False))  # each under the last
        accepted += len(step) - 1
        out += step
    return trimmed(out, length), accepted


def test_over_a_tree_greedy_and_seeded_sampling_equal_awrs_alone():
    for temperature, seeds in ((None, range(5)), (1.0, range(20))):
        total = 0
        for seed in seeds:
            got, accepted = speculative_tree(temperature, seed)
            assert got == alone(temperature, seed)
            total += accepted
        assert total > 0


def test_a_tree_accepts_a_sibling_when_the_best_draft_is_forbidden():
    prefix = [2]
    # nodes: 1 [0], 2 [1], 3 [2], 4 [0, 0], 5 [0, 1], 6 [1, 0], 7 [0, 0, 0]
    tokens = [-1, 2, 4, 6, 8, 1, 3, 5]  # node 1 drafts the forbidden 2, its sibling node 2 drafts 4
    logits = torch.full((TREE.num_nodes, VOCAB), -10.0)
    logits[0, 2], logits[0, 4] = 10.0, 9.0  # the target prefers 2; AWRS draws 4
    logits[2, 3] = 10.0  # after 4 the target picks 3, which node 6 (path [1, 0]) drafted
    step, nodes = verify_tree(sampler(None, 0), TREE, tokens, logits, prefix, EOS)
    assert step[:2] == [4, 3] and nodes == [0, 2, 6] and len(step) == 3  # node 6 is a leaf: then the bonus


def test_chains_cut_at_their_first_forbidden_draft_give_the_same_output():
    assert allowed_drafts(allowed, [2], [4, 6, 6, 8]) == 2  # 6 after 6 is forbidden
    assert allowed_drafts(allowed, [2], [2, 4]) == 0 and allowed_drafts(allowed, [], []) == 0
    for temperature, seeds in ((None, range(5)), (1.0, range(10))):
        for seed in seeds:
            cut, accepted_cut = speculative(temperature, seed, greedy_drafter(3), cut=True)
            full, accepted_full = speculative(temperature, seed, greedy_drafter(3))
            assert cut == full == alone(temperature, seed) and accepted_cut == accepted_full
