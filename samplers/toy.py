"""A small constrained-generation problem whose answer is computable exactly: the oracle for SMC tests
and the distortion benchmark.

Vocabulary {a, b, c, EOS}, a fixed bigram model; constraint: never "bb", and complete only once a "c"
has appeared; sequences end with EOS within ``MAX_TOKENS`` tokens. After "b" the model mostly wants to
stop, which the constraint forbids until a "c" appeared: masking renormalises that mass onto a/c and so
overweights sequences that start with "b", while the true constrained distribution gives them little.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch

A, B, C, EOS = 0, 1, 2, 3
MAX_TOKENS = 6
_START = 4
# Next-token probabilities (a, b, c, EOS) after a, b, c, (EOS: unused), and at the start.
TABLE = torch.tensor([
    [0.30, 0.10, 0.50, 0.10],
    [0.05, 0.05, 0.05, 0.85],
    [0.20, 0.20, 0.10, 0.50],
    [0.00, 0.00, 0.00, 1.00],
    [0.45, 0.45, 0.05, 0.05],
], dtype=torch.float64).clamp(min=1e-12).log()


def next_logits(prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
    return torch.stack([TABLE[p[-1] if p else _START] for p in prefixes])


class NoBBNeedsC:
    def allows(self, prefix: Sequence[int], token: int) -> bool:
        return not (token == B and len(prefix) > 0 and prefix[-1] == B)

    def is_complete(self, prefix: Sequence[int]) -> bool:
        return C in prefix


def log_prob(seq: Sequence[int]) -> float:
    total, prev = 0.0, _START
    for token in seq:
        total += torch.log_softmax(TABLE[prev], 0)[token].item()
        prev = token
    return total


def exact_target(reward: Callable[[tuple], float] = lambda seq: 0.0) -> tuple[dict[tuple, float], float]:
    """pi(x) ∝ p(x) c(x) exp(R(x)) over complete sequences, and its normaliser, by enumeration."""
    constraint, weights = NoBBNeedsC(), {}
    for length in range(MAX_TOKENS):
        for body in itertools.product((A, B, C), repeat=length):
            valid = all(constraint.allows(body[:i], t) for i, t in enumerate(body))
            if valid and constraint.is_complete(body):
                seq = (*body, EOS)
                weights[seq] = math.exp(log_prob(seq) + reward(seq))
    z = sum(weights.values())
    return {seq: w / z for seq, w in weights.items()}, z


def local_decoding() -> dict[tuple, float]:
    """The exact distribution of mask-and-renormalise decoding, over the sequences it completes."""
    constraint, probs = NoBBNeedsC(), {}

    def walk(prefix: tuple, logq: float) -> None:
        if len(prefix) == MAX_TOKENS:
            return
        allowed = [t for t in (A, B, C) if constraint.allows(prefix, t)]
        allowed += [EOS] if constraint.is_complete(prefix) else []
        row = torch.log_softmax(TABLE[prefix[-1] if prefix else _START], 0)
        norm = torch.logsumexp(row[allowed], 0).item()
        for t in allowed:
            if t == EOS:
                probs[(*prefix, EOS)] = math.exp(logq + row[t].item() - norm)
            else:
                walk((*prefix, t), logq + row[t].item() - norm)

    walk((), 0.0)
    total = sum(probs.values())
    return {seq: p / total for seq, p in probs.items()}


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))
