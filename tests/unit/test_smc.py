"""SMC with AWRS on a toy model whose constrained target is computable by enumeration.

Toy: vocabulary {a, b, c, EOS}, a seeded bigram model; constraint: never "bb", and complete only once a
"c" has appeared; sequences end with EOS within 6 tokens. Locally constrained decoding (mask and
renormalise at each step) is biased towards prefixes whose futures are mostly forbidden; SMC corrects it.
Fixed seeds; tolerances are stated with each assertion."""

import itertools
import math

import pytest
import torch

from afterburner.samplers.smc import effective_sample_size, smc

A, B, C, EOS = 0, 1, 2, 3
MAX_TOKENS = 6
# Next-token probabilities (a, b, c, EOS) after a, b, c and at the start. After "b" the model mostly
# wants to stop, which the constraint forbids until a "c" appeared: masking renormalises that mass onto
# a/c and so overweights sequences that start with "b"; the target gives them little mass.
_TABLE = torch.tensor([
    [0.30, 0.10, 0.50, 0.10],  # after a
    [0.05, 0.05, 0.05, 0.85],  # after b
    [0.20, 0.20, 0.10, 0.50],  # after c
    [0.00, 0.00, 0.00, 1.00],  # (unused row: EOS ends a sequence)
    [0.45, 0.45, 0.05, 0.05],  # start
], dtype=torch.float64).clamp(min=1e-12).log()


def next_logits(prefixes):
    return torch.stack([_TABLE[p[-1] if p else 4] for p in prefixes])


class NoBBNeedsC:
    def allows(self, prefix, token):
        return not (token == B and prefix and prefix[-1] == B)

    def is_complete(self, prefix):
        return C in prefix


def _logp(seq):
    total, prev = 0.0, 4
    for token in seq:
        total += torch.log_softmax(_TABLE[prev], 0)[token].item()
        prev = token
    return total


def _exact(reward=lambda seq: 0.0):
    """pi(x) ∝ p(x) c(x) exp(R(x)) over complete sequences, and its normaliser."""
    constraint, weights = NoBBNeedsC(), {}
    for length in range(MAX_TOKENS):
        for body in itertools.product((A, B, C), repeat=length):
            ok = all(constraint.allows(body[:i], t) for i, t in enumerate(body)) and constraint.is_complete(body)
            if ok:
                seq = (*body, EOS)
                weights[seq] = math.exp(_logp(seq) + reward(seq))
    z = sum(weights.values())
    return {seq: w / z for seq, w in weights.items()}, z


def _local_decoding():
    """Exact distribution of mask-and-renormalise decoding, over the sequences it completes."""
    constraint, probs = NoBBNeedsC(), {}

    def walk(prefix, logq):
        if len(prefix) == MAX_TOKENS:
            return
        allowed = [t for t in (A, B, C) if constraint.allows(prefix, t)] + ([EOS] if constraint.is_complete(prefix) else [])
        row = torch.log_softmax(_TABLE[prefix[-1] if prefix else 4], 0)
        norm = torch.logsumexp(row[allowed], 0).item()
        for t in allowed:
            if t == EOS:
                probs[(*prefix, EOS)] = math.exp(logq + row[t].item() - norm)
            else:
                walk((*prefix, t), logq + row[t].item() - norm)

    walk((), 0.0)
    total = sum(probs.values())
    return {seq: p / total for seq, p in probs.items()}


def _tv(p, q):
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def _smc_average(runs, n_particles, seed, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    merged, normalizers = {}, []
    for _ in range(runs):
        result = smc(next_logits, NoBBNeedsC(), n_particles=n_particles, max_tokens=MAX_TOKENS,
                     eos_token_id=EOS, generator=gen, **kwargs)
        normalizers.append(math.exp(result.log_normalizer))
        for seq, p in result.posterior().items():
            merged[seq] = merged.get(seq, 0.0) + p / runs
    return merged, normalizers


def test_smc_converges_to_the_target_and_local_decoding_does_not():
    target, z = _exact()
    estimate, normalizers = _smc_average(runs=60, n_particles=64, seed=0)
    tv_smc, tv_local = _tv(estimate, target), _tv(_local_decoding(), target)
    # Measured with these seeds: tv_smc 0.058 (3,840 exact draws from the target themselves sit at ~0.043
    # from it: the sampling-noise floor over 226 sequences), tv_local 0.42. Tolerance: SMC within 0.1 and
    # at least 4x closer than local decoding.
    assert tv_smc < 0.1 and tv_smc * 4 < tv_local, (tv_smc, tv_local)
    # The normaliser estimate is unbiased: its mean over runs is within 4 standard errors of Z.
    mean = sum(normalizers) / len(normalizers)
    stderr = (sum((x - mean) ** 2 for x in normalizers) / (len(normalizers) - 1)) ** 0.5 / len(normalizers) ** 0.5
    assert abs(mean - z) < 4 * stderr, (mean, z, stderr)


def test_particle_filtering_with_a_reward_targets_the_tilted_distribution():
    reward = lambda seq: 1.5 * seq.count(A)  # noqa: E731
    target, _ = _exact(reward)
    estimate, _ = _smc_average(runs=60, n_particles=64, seed=1, log_twist=lambda tokens: reward(tuple(tokens)))
    untilted, _ = _exact()
    # Measured: 0.082 from the tilted target (noise floor ~0.045), while the untilted target is 0.54 away.
    assert _tv(estimate, target) < 0.15 and _tv(untilted, target) > 0.4


def test_every_particle_satisfies_the_constraint_and_ends_with_eos():
    result = smc(next_logits, NoBBNeedsC(), n_particles=32, max_tokens=MAX_TOKENS, eos_token_id=EOS,
                 generator=torch.Generator().manual_seed(3))
    live = [p for p in result.particles if p.log_weight > -math.inf]
    assert live and all(p.finished and p.tokens[-1] == EOS for p in live)
    assert all(NoBBNeedsC().is_complete(p.tokens[:-1]) for p in live)
    assert all((B, B) not in zip(p.tokens, p.tokens[1:]) for p in live)
    assert result.checks > 0


def test_progress_callback_and_resampling():
    seen = []
    result = smc(next_logits, NoBBNeedsC(), n_particles=16, max_tokens=MAX_TOKENS, eos_token_id=EOS,
                 ess_threshold=1.0, generator=torch.Generator().manual_seed(4), on_step=lambda *a: seen.append(a))
    assert seen and seen[0][0] == 0 and all(0 <= ess <= 16 + 1e-9 for _, _, ess in seen)
    assert result.resamples >= 1


def test_effective_sample_size():
    assert effective_sample_size(torch.zeros(8, dtype=torch.float64)) == pytest.approx(8)
    assert effective_sample_size(torch.tensor([0.0, -math.inf, -math.inf])) == pytest.approx(1)
    assert effective_sample_size(torch.full((3,), -math.inf)) == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        smc(next_logits, NoBBNeedsC(), n_particles=0, max_tokens=3, eos_token_id=EOS)
