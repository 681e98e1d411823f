"""The draft -> verify -> accept reference on the tiny model: greedy output is plain greedy decoding whatever
the drafter (random: nothing accepted; an oracle that errs at its 3rd draft: exactly 2 accepted per step),
a token tree at the first micro-steps accepts a non-greedy branch and stays exact, and at temperature > 0
the first two emitted tokens follow the base distribution (chi-square)."""

import pytest
import torch

from afterburner.spec_decode.acceptance import base_probs
from afterburner.spec_decode.hamburger.reference import base_forward, speculative_generate, speculative_step
from afterburner.spec_decode.medusa.distill_data import load_base
from afterburner.spec_decode.tree import build_tree
from support.hamburger import FixedDrafter, OracleDrafter, TreeOracleDrafter, tiny_drafter
from support.medusa import greedy_tokens
from support.stats import chi_square_p

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see tests/conftest.py

NEW = 24


@pytest.fixture(scope="module")
def tiny(tiny_model):
    model, tokenizer = load_base(tiny_model)
    prompts = [torch.tensor(tokenizer(text)["input_ids"]) for text in ("The cat sat on the", "Numbers: 1 2 3")]
    return model, prompts


def test_greedy_with_a_random_drafter_is_plain_greedy(tiny):
    model, prompts = tiny
    drafter = tiny_drafter(model)
    for prompt in prompts:
        tokens, accepted = speculative_generate(model, drafter, prompt, NEW, max_tokens=4, stop_threshold=None)
        assert tokens == greedy_tokens(model, prompt, NEW)
        assert len(accepted) >= NEW // 5  # nothing (or nearly) accepted: about one token per step


def test_greedy_with_an_oracle_drafter_accepts_and_stays_exact(tiny):
    model, prompts = tiny
    for prompt in prompts:
        expected = greedy_tokens(model, prompt, NEW + 8)
        oracle = OracleDrafter(model, torch.cat([prompt, torch.tensor(expected)]), wrong_at=3)
        tokens, accepted = speculative_generate(model, oracle, prompt, NEW, max_tokens=4, stop_threshold=None)
        assert tokens == expected[:NEW]
        assert accepted[:-1] == [2] * (len(accepted) - 1)  # drafts 1-2 right, 3rd wrong: 3 tokens per step
        # a drafter that drafts nothing decodes one token per step
        none, lengths = speculative_generate(model, oracle, prompt, NEW, max_tokens=0, stop_threshold=None)
        assert none == expected[:NEW] and lengths == [0] * (NEW - 1)


def test_a_tree_at_the_first_micro_steps_accepts_a_non_greedy_branch_and_stays_exact(tiny):
    model, prompts = tiny
    tree = build_tree([(0,), (1,), (1, 0)], max_depth=2)
    for prompt in prompts:
        expected = greedy_tokens(model, prompt, NEW + 8)
        oracle = TreeOracleDrafter(model, torch.cat([prompt, torch.tensor(expected)]))
        tokens, accepted = speculative_generate(model, oracle, prompt, NEW, tree=tree)
        assert tokens == expected[:NEW]
        assert accepted[:-1] == [2] * (len(accepted) - 1)  # path (1, 0), features from its last node
    random = tiny_drafter(model)  # a real drafter's top-k: greedy stays exact
    for prompt in prompts:
        tokens, _ = speculative_generate(model, random, prompt, NEW, tree=build_tree([(0,), (1,), (0, 0), (1, 0)],
                                                                                     max_depth=2))
        assert tokens == greedy_tokens(model, prompt, NEW)


def test_draft_topk_starts_with_the_greedy_chain(tiny):
    model, prompts = tiny
    drafter = tiny_drafter(model)
    features = base_forward(model, prompts[0], (1,))[1][-1:]
    top = drafter.draft_topk(features, prompts[0][-1:], depth=3, topk=2)
    assert top.shape == (1, 3, 2)
    assert top[0, :, 0].tolist() == drafter.draft(features, prompts[0][-1:], max_tokens=3, stop_threshold=None)[0]


def test_sampled_tokens_follow_the_base_distribution(tiny):
    """Two drafts, the base's likeliest token then its likeliest after that: the first emitted token must be
    distributed as p(. | prompt) (the draft is accepted with probability p(draft), else the residual is
    sampled), and the second, after the first draft was accepted, as p(. | prompt, draft 1). 1500 steps,
    fixed seed; the chi-square p-value must exceed 1e-3 (a correct rule fails 1 seed in 1000), bins of
    expected count < 20 lumped together."""
    model, prompts = tiny
    prompt, temperature, trials = prompts[0], 0.05, 1500  # the random tiny model is flat: T 0.05 gives p ~ 0.6
    logits, features = base_forward(model, prompt, (1,))
    p1 = base_probs(logits[-1], temperature)
    d1 = int(p1.argmax())
    logits2, _ = base_forward(model, torch.cat([prompt, torch.tensor([d1])]), (1,))
    p2 = base_probs(logits2[-1], temperature)
    d2 = int(p2.argmax())
    assert 0.1 < p1[d1] < 0.9 and 0.1 < p2[d2] < 0.9, (p1[d1], p2[d2])  # both accept and reject happen
    drafter = FixedDrafter(tiny_drafter(model).config, [d1, d2])
    generator = torch.Generator().manual_seed(0)
    first, second = torch.zeros(p1.numel()), torch.zeros(p2.numel())
    for _ in range(trials):  # a step after prompt[-1] reads the features at the position before it
        emitted, _, _ = speculative_step(model, drafter, prompt, features[-2], temperature=temperature,
                                         generator=generator, max_tokens=2, stop_threshold=None)
        first[emitted[0]] += 1
        if emitted[0] == d1:
            second[emitted[1]] += 1
    for counts, probs in ((first, p1), (second, p2)):
        assert chi_square_p(*lumped(counts, probs, counts.sum())) > 1e-3
    # the same check catches a rule that always accepts the draft
    always = torch.zeros_like(first)
    always[d1] = trials
    assert chi_square_p(*lumped(always, p1, trials)) < 1e-6


def lumped(counts: torch.Tensor, probs: torch.Tensor, total) -> tuple[torch.Tensor, torch.Tensor]:
    big = probs * total >= 20
    return (torch.cat([counts[big], counts[~big].sum()[None]]).double(),
            torch.cat([probs[big], probs[~big].sum()[None]]).double())
