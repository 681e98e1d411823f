"""Sequential Monte Carlo over constrained sequences, with AWRS as the per-token proposal.

Target over complete sequences x (ending in EOS within ``max_tokens``):
    pi(x) ∝ p(x) c(x) exp(R(x))
p: the model, c: the constraint (every prefix viable, the sequence complete), R: an optional reward
(``log_twist``; 0 without one). Each particle is extended by one AWRS token per step; its weight is
multiplied by AWRS's unbiased estimate of the allowed next-token mass (and, with a twist, by
exp(R(new prefix) - R(old prefix)), which telescopes to exp(R(x)) at the end: particle filtering with a
reward, the inference-time-scaling use). When the effective sample size (sum w)^2 / sum w^2 falls below
``ess_threshold * N`` the population is resampled multinomially and every weight is set to the mean, so
mean(w) stays an unbiased estimate of the normalising constant. Finished particles are frozen (not
extended) but keep taking part in resampling. A particle that reaches ``max_tokens`` without EOS lies
outside the target's support and gets weight 0.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from afterburner.samplers.awrs import awrs_step
from afterburner.samplers.constraints import Constraint, allows_next

# prefixes (one list of token ids per live particle) -> next-token logits [len(prefixes), V]
NextLogits = Callable[[Sequence[Sequence[int]]], torch.Tensor]


class SMCArgumentError(ValueError):
    """An SMC argument out of range (its name and value in the message)."""


class RewardError(RuntimeError):
    """The reward (``log_twist``) raised, or returned something that is not a log-weight (NaN, +inf)."""


def check_arguments(*, n_particles: int, max_tokens: int, ess_threshold: float) -> None:
    """``SMCArgumentError`` naming the first bad argument and its value (one line), before any work is done."""
    for name, value in (("n_particles", n_particles), ("max_tokens", max_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SMCArgumentError(f"SMC needs {name} >= 1 (an integer), got {value!r}")
    if not isinstance(ess_threshold, (int, float)) or not 0.0 <= ess_threshold <= 1.0:
        raise SMCArgumentError(f"SMC needs 0 <= ess_threshold <= 1, got {ess_threshold!r}")


def reward(log_twist: Callable[[Sequence[int]], float], tokens: list[int]) -> float:
    """R(tokens), or ``RewardError``: -inf is a valid reward (weight 0), NaN and +inf are not."""
    try:
        value = float(log_twist(tokens))
    except Exception as exc:  # noqa: BLE001 - the user's reward: say where it failed, keep its traceback
        raise RewardError(f"log_twist raised {type(exc).__name__}: {exc} (on a particle of {len(tokens)} tokens)") \
            from exc
    if math.isnan(value) or value == math.inf:
        raise RewardError(f"log_twist returned {value} on a particle of {len(tokens)} tokens; a reward is a "
                          "finite log-weight, or -inf for weight 0")
    return value


@dataclass
class Particle:
    tokens: list[int] = field(default_factory=list)  # generated ids, EOS included once finished
    log_weight: float = 0.0
    finished: bool = False


@dataclass(frozen=True)
class SMCResult:
    particles: list[Particle]
    log_normalizer: float  # log of the estimate of sum_x p(x) c(x) exp(R(x))
    checks: int  # constraint evaluations, all particles and steps
    resamples: int

    def weights(self) -> list[float]:
        """Each particle's normalised weight, in particle order (all 0 when every particle died)."""
        log_weights = torch.tensor([p.log_weight for p in self.particles], dtype=torch.float64)
        if not torch.isfinite(log_weights).any():
            return [0.0] * len(self.particles)
        return torch.softmax(log_weights, dim=0).tolist()

    def posterior(self) -> dict[tuple[int, ...], float]:
        """The weighted particles as a distribution over sequences (weights normalised)."""
        merged: dict[tuple[int, ...], float] = defaultdict(float)
        for particle, prob in zip(self.particles, self.weights(), strict=False):
            if prob > 0:
                merged[tuple(particle.tokens)] += prob
        return dict(merged)


@dataclass(frozen=True)
class Sample:
    text: str
    token_ids: list[int]  # EOS left out
    weight: float  # normalised importance weight of this particle
    log_weight: float


def weighted_samples(result: SMCResult, decode: Callable[[list[int]], str], eos_token_id: int) -> list[Sample]:
    """The particles as decoded samples with their normalised weights, best first."""
    samples = []
    for particle, weight in zip(result.particles, result.weights(), strict=False):
        ids = [t for t in particle.tokens if t != eos_token_id]
        samples.append(Sample(decode(ids), ids, weight, particle.log_weight))
    return sorted(samples, key=lambda s: -s.weight)


def print_progress(step: int, live: int, ess: float) -> None:
    """An ``on_step`` callback: one self-overwriting progress line on stderr."""
    print(f"\r[afterburner smc] step {step + 1}: {live} live particles, ESS {ess:.1f}", end="", file=sys.stderr,
          flush=True)


def effective_sample_size(log_weights: torch.Tensor) -> float:
    """(sum w)^2 / sum w^2, computed from log weights; 0 when every weight is 0."""
    if not torch.isfinite(log_weights).any():
        return 0.0
    return math.exp(2 * torch.logsumexp(log_weights, 0).item() - torch.logsumexp(2 * log_weights, 0).item())


def resample(particles: list[Particle], generator: torch.Generator | None) -> tuple[list[Particle], list[int]]:
    """Multinomial resampling: (the new population, each new particle's parent index); every weight becomes
    the mean, so the mean stays an unbiased estimate of the normalising constant."""
    log_weights = torch.tensor([p.log_weight for p in particles], dtype=torch.float64)
    log_mean = (torch.logsumexp(log_weights, 0) - math.log(len(particles))).item()
    picks = torch.multinomial(torch.softmax(log_weights, 0), len(particles), replacement=True,
                              generator=generator).tolist()
    return [Particle(list(particles[i].tokens), log_mean, particles[i].finished) for i in picks], picks


def end_step(
    particles: list[Particle],
    twists: list[float],
    step: int,
    *,
    ess_threshold: float,
    generator: torch.Generator | None,
    on_step: Callable[[int, int, float], None] | None,
) -> tuple[list[Particle], list[float], bool] | None:
    """The end of an SMC step: report ``on_step(step, live_particles, ess)``, then resample when the ESS is
    below ``ess_threshold * N`` and a particle is still live; each new particle takes its parent's twist
    (R(prefix)). (particles, twists, whether it resampled), or None when every weight is 0 (stop)."""
    ess = effective_sample_size(torch.tensor([p.log_weight for p in particles], dtype=torch.float64))
    if on_step:
        on_step(step, sum(not p.finished for p in particles), ess)
    if ess == 0.0:
        return None
    if ess < ess_threshold * len(particles) and any(not p.finished for p in particles):
        particles, parents = resample(particles, generator)
        return particles, [twists[i] for i in parents], True
    return particles, twists, False


def smc(
    next_logits: NextLogits,
    constraint: Constraint,
    *,
    n_particles: int,
    max_tokens: int,
    eos_token_id: int,
    ess_threshold: float = 0.5,
    log_twist: Callable[[Sequence[int]], float] | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> SMCResult:
    """Run SMC; ``on_step(step, live_particles, ess)`` reports progress after each step. Bad arguments are
    an ``SMCArgumentError`` (a ``ValueError``), a failing reward a ``RewardError`` (both one line)."""
    check_arguments(n_particles=n_particles, max_tokens=max_tokens, ess_threshold=ess_threshold)
    particles = [Particle() for _ in range(n_particles)]
    twists = [0.0] * n_particles  # R(prefix) of each particle (0 without a reward)
    checks = resamples = 0
    for step in range(max_tokens):
        live = [i for i, p in enumerate(particles) if not p.finished]
        if not live:
            break
        logits = next_logits([particles[i].tokens for i in live])
        for i, row in zip(live, logits, strict=False):
            particle = particles[i]
            prefix = particle.tokens
            result = awrs_step(row, lambda t, prefix=prefix: allows_next(constraint, prefix, t, eos_token_id),
                               generator=generator)
            checks += result.checks
            particle.log_weight += result.log_weight
            particle.tokens = [*prefix, result.token]
            particle.finished = result.token == eos_token_id or not result.accepted
            if not particle.finished and len(particle.tokens) == max_tokens:
                particle.finished, particle.log_weight = True, -math.inf
            if log_twist and result.accepted:
                new_twist = reward(log_twist, particle.tokens)
                particle.log_weight += new_twist - twists[i]
                twists[i] = new_twist
        ended = end_step(particles, twists, step, ess_threshold=ess_threshold, generator=generator, on_step=on_step)
        if ended is None:
            break
        particles, twists, resampled = ended
        resamples += resampled
    log_weights = torch.tensor([p.log_weight for p in particles], dtype=torch.float64)
    log_normalizer = (torch.logsumexp(log_weights, 0) - math.log(n_particles)).item()
    return SMCResult(particles, log_normalizer, checks, resamples)
