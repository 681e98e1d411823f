"""A learned stop for speculative drafters: P(this draft is accepted) from the drafter's state and the
confidence of its draft distribution (SpecDec++'s acceptance head, HAMburger's stop head).

The head is a two-layer MLP on [state, top log-probability, entropy]: the state says what the drafter has
seen, the two numbers how sure its distribution is (the signal a confidence stop uses alone). The micro-step
drafter carries one (``hamburger/drafter.py``, trained with it); ``eagle3/stop_train.py`` fits one on a
frozen EAGLE-3 drafter, so vLLM's own EAGLE-3 proposer and the stop run the same drafter weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def confidence_features(logits: torch.Tensor) -> torch.Tensor:
    """[..., 2]: the draft distribution's top log-probability and entropy (nats), from logits [..., V];
    entries at -inf (tokens outside a drafting vocabulary) carry no mass and add nothing to the entropy."""
    logq = torch.log_softmax(logits.float(), -1)
    q = logq.exp()
    entropy = -torch.where(q > 0, q * logq, torch.zeros_like(q)).sum(-1)
    return torch.stack([logq.max(-1).values, entropy], -1)


class StopHead(nn.Sequential):
    """Linear(hidden + 2, width) -> SiLU -> Linear(width, 1) (weights ``0.*``, ``2.*``); ``p_accept`` applies
    it with a sigmoid. Built like any ``nn.Sequential``; ``reset`` gives the drafters' init."""

    def __init__(self, hidden_size: int, width: int | None = None):
        width = width or max(16, hidden_size // 4)
        super().__init__(nn.Linear(hidden_size + 2, width), nn.SiLU(), nn.Linear(width, 1))
        self.hidden_size, self.width = hidden_size, width

    def reset(self, generator: torch.Generator | None = None) -> StopHead:
        for layer in (self[0], self[2]):
            nn.init.normal_(layer.weight, std=1 / math.sqrt(layer.in_features), generator=generator)
            nn.init.zeros_(layer.bias)
        return self

    def p_accept(self, states: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """[...] P(accepted) from states [..., hidden] and the draft logits [..., V] they produced (the
        confidence is read without gradient: the head learns from it, it does not reshape the drafter)."""
        with torch.no_grad():
            confidence = confidence_features(logits).to(states.dtype)
        return torch.sigmoid(self(torch.cat([states, confidence], -1)).squeeze(-1))
