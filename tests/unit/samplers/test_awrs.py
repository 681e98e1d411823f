"""AWRS against the exact masked softmax: the accepted token's distribution (chi-square), the weight's
mean (the allowed mass), proper weighting per token, and that it checks far fewer tokens than masking.

Seeds are fixed; each statistical assertion states its tolerance. With fixed seeds the tests are
deterministic; the tolerances are chosen so that a correct sampler passes for most seeds (p > 0.001,
4 standard errors), while a wrong one (e.g. plain softmax, or a weight missing its tail term) fails."""

import math

import pytest
import torch

from afterburner.samplers.awrs import allowed_mask, allowed_mass, awrs_step, masked_logprobs
from support.stats import chi_square_p

N = 20_000


def _case(seed: int, vocab: int, allowed_fraction: float):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=gen, dtype=torch.float64) * 2
    mask = torch.rand(vocab, generator=gen) < allowed_fraction
    mask[torch.randint(vocab, (1,), generator=gen)] = True  # never empty
    return logits, mask


def _run(logits, mask, seed, n=N):
    gen = torch.Generator().manual_seed(seed)
    accept = lambda t: bool(mask[t])  # noqa: E731
    return [awrs_step(logits, accept, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("seed, vocab, fraction", [(0, 12, 0.5), (1, 30, 0.2), (2, 8, 0.9), (3, 50, 0.08)])
def test_accepted_tokens_follow_the_masked_softmax(seed, vocab, fraction):
    logits, mask = _case(seed, vocab, fraction)
    results = _run(logits, mask, seed + 100)
    assert all(r.accepted and mask[r.token] for r in results)
    counts = torch.bincount(torch.tensor([r.token for r in results]), minlength=vocab).double()
    target = masked_logprobs(logits, mask).exp()
    assert chi_square_p(counts, target) > 1e-3
    # The same test rejects the unconstrained softmax restricted after the fact: it is a real test.
    assert chi_square_p(counts, torch.softmax(logits, 0)) < 1e-6 or mask.all()


@pytest.mark.parametrize("seed, vocab, fraction", [(0, 12, 0.5), (1, 30, 0.2), (3, 50, 0.08), (4, 6, 0.34)])
def test_weight_is_unbiased_and_properly_weighted(seed, vocab, fraction):
    logits, mask = _case(seed, vocab, fraction)
    results = _run(logits, mask, seed + 200)
    weights = torch.tensor([math.exp(r.log_weight) for r in results], dtype=torch.float64)
    z = allowed_mass(logits, mask)
    stderr = weights.std().item() / math.sqrt(N)
    assert abs(weights.mean().item() - z) < 4 * stderr + 1e-12
    # Proper weighting: E[w 1{x = a}] = p(a) c(a) for every token a (4 standard errors each).
    probs = torch.softmax(logits, 0)
    tokens = torch.tensor([r.token for r in results])
    for a in torch.nonzero(mask).flatten().tolist():
        hit = weights * (tokens == a)
        assert abs(hit.mean().item() - probs[a].item()) < 4 * hit.std().item() / math.sqrt(N) + 1e-9


def test_all_allowed_gives_weight_one_and_softmax_samples():
    logits = torch.tensor([0.0, 1.0, 2.0])
    results = _run(logits, torch.ones(3, dtype=torch.bool), 7, n=5000)
    assert all(r.log_weight == 0.0 for r in results)
    counts = torch.bincount(torch.tensor([r.token for r in results]), minlength=3).double()
    assert chi_square_p(counts, torch.softmax(logits.double(), 0)) > 1e-3


def test_nothing_allowed_ends_with_zero_weight_after_visiting_every_token():
    logits = torch.zeros(10)
    result = awrs_step(logits, lambda t: False, generator=torch.Generator().manual_seed(0))
    assert not result.accepted and result.log_weight == -math.inf and result.checks == 10


def test_masked_out_tokens_are_never_visited():
    logits = torch.tensor([0.0, -math.inf, 0.0, -math.inf])
    visited = []
    awrs_step(logits, lambda t: visited.append(t) or False, generator=torch.Generator().manual_seed(0))
    assert sorted(visited) == [0, 2]


def test_max_checks_bounds_the_work():
    result = awrs_step(torch.zeros(100), lambda t: t == 99, generator=torch.Generator().manual_seed(0), max_checks=5)
    assert result.checks <= 5 and (result.accepted or result.log_weight == -math.inf)


def test_checks_far_fewer_tokens_than_full_masking():
    """A peaked 5,000-token distribution with half the tokens allowed: a handful of checks per token."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(5000, generator=gen) * 3
    mask = torch.rand(5000, generator=gen) < 0.5
    results = _run(logits, mask, 9, n=500)
    mean_checks = sum(r.checks for r in results) / len(results)
    assert mean_checks < 10
    assert allowed_mask(5000, lambda t: bool(mask[t])).equal(mask)
