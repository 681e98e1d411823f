"""Sequential Monte Carlo whose proposal is the model's own sampler, a chunk of tokens per step: particle
filtering over anything that samples text, such as a ``vllm serve`` with speculative decoding or sparse
attention on (``plugins/server_smc.py``), so the particles' tokens come at the server's speed.

Target as in ``smc.py``: pi(x) ∝ p(x) c(x) exp(R(x)) over complete sequences (ending in EOS within
``max_tokens``). Proposal: p itself; ``extend(prefixes, k)`` samples up to k more tokens after each prefix
at temperature 1 (ending early at EOS). Because proposal and model agree, p cancels from the importance
weight and only the potential phi(prefix) = viable(prefix) * exp(R(prefix)) remains:
    log w += log phi(new prefix) - log phi(old prefix)
viable: every token of the prefix is allowed by the constraint (``allows_next``; EOS only after a complete
prefix). This is the bootstrap particle filter with a twist (SMC steering, Lew et al. 2023): properly
weighted for pi, and the mean weight (with the same multinomial resampling as ``smc.py``) is an unbiased
estimate of Z = sum_x p(x) c(x) exp(R(x)). A particle that breaks the constraint dies (weight 0) and is
replaced at the next resampling; one that reaches ``max_tokens`` without EOS gets weight 0.

Compared with ``smc.py`` (AWRS proposes each token from p restricted to the constraint, one engine request
per token per particle): no constrained draw, chunks of k tokens per request, any engine speed-up applies;
the price is particles wasted on continuations that leave the constraint, so it suits constraints that
seldom bind (a reward, a loose format), not ones most continuations break.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from afterburner.samplers.constraints import Constraint, allows_next
from afterburner.samplers.smc import (
    Particle,
    SMCArgumentError,
    SMCResult,
    check_arguments,
    end_step,
    reward,
)

# (prefixes, max new tokens each) -> per prefix: the sampled tokens (EOS last when the sequence ended)
Extend = Callable[[Sequence[Sequence[int]], int], list[list[int]]]


def _viable_after(constraint: Constraint | None, prefix: list[int], chunk: list[int],
                  eos_token_id: int) -> tuple[bool, int]:
    """(whether every token of ``chunk`` is allowed after ``prefix`` (EOS only where the prefix is complete),
    the constraint checks made: up to the first token refused)."""
    if constraint is None:
        return True, 0
    tokens = list(prefix)
    for checked, token in enumerate(chunk, start=1):
        if not allows_next(constraint, tokens, token, eos_token_id):
            return False, checked
        tokens.append(token)
    return True, len(chunk)


def chunked_smc(
    extend: Extend,
    constraint: Constraint | None,
    *,
    n_particles: int,
    max_tokens: int,
    eos_token_id: int,
    chunk_tokens: int = 8,
    ess_threshold: float = 0.5,
    log_twist: Callable[[Sequence[int]], float] | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> SMCResult:
    """Run SMC with chunked proposals from ``extend``; ``on_step(step, live_particles, ess)`` after each step.
    ``SMCResult.checks`` counts constraint checks. Bad arguments are one ``SMCArgumentError`` line."""
    check_arguments(n_particles=n_particles, max_tokens=max_tokens, ess_threshold=ess_threshold)
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        raise SMCArgumentError(f"SMC needs chunk_tokens >= 1 (an integer), got {chunk_tokens!r}")
    particles = [Particle() for _ in range(n_particles)]
    twists = [0.0] * n_particles  # R(prefix) of each particle (0 without a reward)
    checks = resamples = step = 0
    while any(not p.finished for p in particles):
        live = [i for i, p in enumerate(particles) if not p.finished]
        want = min(chunk_tokens, max_tokens - min(len(particles[i].tokens) for i in live))
        chunks = extend([particles[i].tokens for i in live], want)
        for i, chunk in zip(live, chunks, strict=True):
            particle = particles[i]
            chunk = list(chunk)[: max_tokens - len(particle.tokens)]
            ended = bool(chunk) and chunk[-1] == eos_token_id
            if not chunk or (eos_token_id in chunk[:-1]):
                raise RuntimeError(f"extend returned {chunk!r} for a live particle: at least one token, EOS only last")
            viable, checked = _viable_after(constraint, particle.tokens, chunk, eos_token_id)
            checks += checked
            particle.tokens = [*particle.tokens, *chunk]
            if not viable:
                particle.finished, particle.log_weight = True, -math.inf
                continue
            particle.finished = ended or len(particle.tokens) >= max_tokens
            if particle.finished and not ended:  # out of tokens before EOS: outside the target's support
                particle.log_weight = -math.inf
                continue
            if log_twist:
                new = reward(log_twist, particle.tokens)
                particle.log_weight += new - twists[i]
                twists[i] = new
        ended = end_step(particles, twists, step, ess_threshold=ess_threshold, generator=generator, on_step=on_step)
        step += 1
        if ended is None:
            break
        particles, twists, resampled = ended
        resamples += resampled
    log_weights = torch.tensor([p.log_weight for p in particles], dtype=torch.float64)
    log_normalizer = (torch.logsumexp(log_weights, 0) - math.log(n_particles)).item()
    return SMCResult(particles, log_normalizer, checks, resamples)
