"""Adaptive weighted rejection sampling (AWRS) of one constrained token.

Lipkin et al., "Fast Controlled Generation from Language Models with Adaptive Weighted Rejection
Sampling" (COLM 2025, arXiv:2504.05410).

Target: the model's next-token distribution p restricted to the tokens a constraint c allows,
    pi(x) = p(x) c(x) / Z,    Z = sum_x p(x) c(x),    c(x) in {0, 1}.

1. Exact sample. Perturb log p with i.i.d. Gumbel noise and visit tokens in decreasing key order: that is
   sampling from p without replacement. Checking c only on visited tokens, the first accepted token x_k is
   distributed exactly as pi (removing rejected tokens and renormalising keeps the ratios between allowed
   tokens).
2. Weight. With r_j the p-mass rejected before visit j and q_j = p(x_j) / (1 - r_j) the chance of drawing
   x_j from what remains, the allowed mass Z_j of the renormalised remainder obeys
       Z_j = q_j c(x_j) + (1 - q_j) Z_{j+1}.
   Unrolled over the rejected visits j < k, with the tail Z_{k+1} estimated by one more check (the next
   token in the order is a draw from that remainder):
       Z_hat = prod_{j<k} (1 - q_j) * (q_k + (1 - q_k) c(x_{k+1}))
   E[Z_hat] = Z, and (x_k, Z_hat) is properly weighted for pi: E[Z_hat f(x_k)] = sum_x p(x) c(x) f(x)
   for any f. Cost: k + 1 constraint checks (k when x_k is the last token with mass).

The constraint is checked only on visited tokens, never on the whole vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

# Rejected mass this close to 1 leaves nothing to sample; the weight there is ~0 anyway.
_EXHAUSTED = 1.0 - 1e-9
_FIRST_CHUNK = 64  # the walk almost always stops within the top few keys: avoid sorting the vocabulary


@dataclass(frozen=True)
class AWRSResult:
    token: int  # the accepted token; when nothing was accepted, the last rejected one (-1 if none visited)
    log_weight: float  # log Z_hat, an unbiased estimate of the allowed mass; -inf when nothing was accepted
    checks: int  # constraint evaluations made
    accepted: bool


def gumbel_keys(logprobs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """log p + Gumbel(0, 1) noise; tokens with log p = -inf keep key -inf. logprobs: [V]."""
    uniform = torch.rand(logprobs.shape, generator=generator, dtype=logprobs.dtype, device=logprobs.device)
    uniform = uniform.clamp_(min=torch.finfo(logprobs.dtype).tiny)
    return logprobs - torch.log(-torch.log(uniform))


def _descending(keys: torch.Tensor) -> Iterator[int]:
    """Token ids by decreasing key, stopping at -inf: top-k first, one full sort if the walk goes deeper."""
    first = min(_FIRST_CHUNK, keys.numel())
    top = torch.topk(keys, first).indices.tolist()
    for token in top:
        if keys[token] == -math.inf:
            return
        yield token
    for token in torch.argsort(keys, descending=True).tolist()[first:]:
        if keys[token] == -math.inf:
            return
        yield token


def awrs_step(
    logits: torch.Tensor,
    accept: Callable[[int], bool],
    *,
    generator: torch.Generator | None = None,
    max_checks: int | None = None,
) -> AWRSResult:
    """Draw one token from softmax(logits) restricted to ``accept``, with its importance weight.

    logits: [V] (float32 or float64; vector work stays in that dtype, a float64 cast of 49k logits costs
    more than the whole walk; the walk's running sums are Python floats). ``accept(token)`` is the
    constraint.
    ``max_checks`` bounds the work; hitting it without an acceptance returns weight -inf (a zero-weight
    sample: the caller drops or resamples it).
    """
    logprobs = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    keys = gumbel_keys(logprobs, generator)
    order = _descending(keys)
    rejected_mass = 0.0
    log_prefix = 0.0  # log prod_{j<k} (1 - q_j)
    checks = 0
    last = -1
    for token in order:
        if max_checks is not None and checks >= max_checks:
            break
        checks += 1
        p = math.exp(logprobs[token].item())
        q = min(p / (1.0 - rejected_mass), 1.0)
        if accept(token):
            tail = next(order, None)
            if tail is None:  # x_k held all remaining mass: Z_k = q_k = 1
                return AWRSResult(token, log_prefix, checks, True)
            checks += 1
            estimate = 1.0 if accept(tail) else q
            return AWRSResult(token, log_prefix + math.log(estimate), checks, True)
        last = token
        rejected_mass += p
        if rejected_mass >= _EXHAUSTED or q >= 1.0:
            break
        log_prefix += math.log1p(-q)
    return AWRSResult(last, -math.inf, checks, False)


def exact_draw(logits: torch.Tensor, mask: torch.Tensor, *, temperature: float | None,
               generator: torch.Generator | None = None) -> tuple[int | None, float]:
    """One token from softmax(logits / T) restricted to ``mask`` [V] bool, and log Z, the allowed mass;
    greedy (``temperature`` None): the highest-logit allowed token. (None, -inf) when nothing is allowed.

    The fallback when AWRS's check budget runs out: the tokens its walk rejected were all disallowed, and
    given the Gumbel keys above them the order of the others is still a draw from p, so a fresh draw from
    p restricted to the allowed set is the token AWRS would have reached. Works where p underflows to 0 on
    every allowed token (the softmax is taken over the allowed logits themselves)."""
    if not bool(mask.any()):
        return None, -math.inf
    scaled = logits.double() / (temperature or 1.0)
    allowed = scaled.masked_fill(~mask, -math.inf)
    log_z = (torch.logsumexp(allowed, -1) - torch.logsumexp(scaled, -1)).item()
    if temperature is None:
        return int(torch.argmax(allowed)), log_z
    probs = torch.softmax(allowed, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator)), log_z


# ---- exact references (full-vocabulary checks): the oracle for tests and the baseline for benchmarks ----


def allowed_mask(vocab_size: int, accept: Callable[[int], bool]) -> torch.Tensor:
    """[V] bool: the constraint checked on every token, as token masking does."""
    return torch.tensor([bool(accept(token)) for token in range(vocab_size)], dtype=torch.bool)


def masked_logprobs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi: log_softmax of logits over the allowed tokens only. logits, mask: [V]."""
    return torch.log_softmax(logits.double().masked_fill(~mask, -math.inf), dim=-1)


def allowed_mass(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Z = sum of softmax(logits) over the allowed tokens."""
    return torch.softmax(logits.double(), dim=-1)[mask].sum().item()


def constrained_argmax(logits: torch.Tensor, accept: Callable[[int], bool], *, max_checks: int | None = None
                       ) -> tuple[int | None, int]:
    """Greedy decoding under a constraint: the highest-logit allowed token, checking tokens in decreasing
    logit order (AWRS without the noise). Returns (token or None if none allowed, checks made)."""
    checks = 0
    for token in _descending(logits):
        if max_checks is not None and checks >= max_checks:
            break
        checks += 1
        if accept(token):
            return token, checks
    return None, checks
