"""SpecPC's rule (Draft-based Approximate Inference for LLMs, arXiv 2506.08373, section on prompt compression;
checked against the authors' code, furiosa-ai/draft-based-approx-llm, ``specpc/specpc.py`` and
``specpc/specpc_utils.py``): which prompt tokens a target model keeps, judged from a draft model's attention.

Scores. The draft reads the prompt (L tokens) and greedily writes ``lookahead`` tokens. Two kinds of attention
rows over the prompt's keys count:
- prefill: the last ``window`` prompt queries, row j of Q weighted j / (Q - 1) (0 -> 1, ``weighted_query``);
- look-ahead: each generated token that is fed back (the first ``lookahead - 1``: the last one is only
  predicted), its single query unweighted, keys cut to the prompt.
Each step's score per prompt key is the max over layers >= ``start_layer``, heads and queries; the score is
the max over steps.

Selection (capacity C < L; C >= L keeps every token):
1. max-pool the scores with a centred kernel K (zero padded: (K-1)//2 before, the rest after);
2. rank tokens by pooled score, descending; ties: the earlier token first (the paper's ``topk`` leaves ties
   unspecified); take the top C;
3. candidates, in order: the last ``window`` tokens, then for each ranked token itself and its neighbours
   (a span of N positions: (N-1)//2 before, N-1-(N-1)//2 after), nearest first, the earlier side first at
   equal distance, clipped to [0, L);
4. keep the first C distinct candidates, returned in prompt order.

Defaults are the paper code's ``SpecPCConfig`` defaults and its released configs: window 64, kernel 64
(its configs also use 32), neighbours = kernel (so K = N = 64 keeps 31 before and 32 after each top token),
start layer 8, look-ahead 1 (every released config), weighted queries, max reductions.

``*_reference`` functions state the rule with loops (the spec); ``step_scores`` and ``select_tokens`` are the
vectorised paths the draft runner uses, tested equal to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SpecPCSettings:
    capacity: int = 1024  # C: prompt tokens kept (the paper: 1024 / 2048 / 3072)
    window: int = 64  # last prompt queries scored, and last prompt tokens always kept
    kernel: int = 64  # max-pool kernel over token scores
    neighbours: int = 64  # span kept around each top token (itself included)
    start_layer: int = 8  # draft layers below this one are not scored
    lookahead: int = 1  # tokens the draft generates greedily
    weighted_query: bool = True  # prefill rows weighted 0 -> 1

    def __post_init__(self):
        for name in ("capacity", "window", "kernel", "lookahead"):
            if getattr(self, name) < 1:
                raise ValueError(f"SpecPCSettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.neighbours < 0 or self.start_layer < 0:
            raise ValueError("SpecPCSettings.neighbours and .start_layer must be >= 0")
        if self.capacity < self.window:
            raise ValueError(f"SpecPCSettings.capacity ({self.capacity}) must be >= window ({self.window}): "
                             "the last window tokens are always kept")


def neighbour_offsets(span: int) -> list[int]:
    """Offsets of a kept span around a top token, nearest first (earlier side first at equal distance)."""
    if span <= 1:
        return [0]
    before = (span - 1) // 2
    return sorted(range(-before, span - before), key=lambda d: (abs(d), d))


# ---------------------------------------------------------------------------------------------- references


def step_scores_reference(layers: Sequence[torch.Tensor], *, prompt_len: int, start_layer: int,
                          weighted_query: bool) -> torch.Tensor:
    """One draft step's score per prompt key. ``layers[l]``: [H, Q, K] softmax rows of layer l (K >= prompt_len);
    returns [prompt_len]."""
    scores = torch.zeros(prompt_len, dtype=torch.float32)
    for layer, weights in enumerate(layers):
        if layer < start_layer:
            continue
        heads, queries, _ = weights.shape
        for q in range(queries):
            weight = q / (queries - 1) if (weighted_query and queries > 1) else 1.0
            for h in range(heads):
                scores = torch.maximum(scores, weights[h, q, :prompt_len].float() * weight)
    return scores


def select_reference(scores: torch.Tensor, *, capacity: int, window: int, kernel: int,
                     neighbours: int) -> torch.Tensor:
    """Kept prompt positions, ascending. ``scores``: [L] (non-negative)."""
    values = scores.tolist()
    length = len(values)
    if capacity >= length:
        return torch.arange(length)
    before = (kernel - 1) // 2
    padded = [0.0] * before + values + [0.0] * (kernel - 1 - before)
    pooled = [max(padded[i:i + kernel]) for i in range(length)]
    ranked = sorted(range(length), key=lambda i: (-pooled[i], i))[:capacity]
    candidates = list(range(length - min(window, length), length))
    candidates += [min(max(i + d, 0), length - 1) for i in ranked for d in neighbour_offsets(neighbours)]
    kept: list[int] = []
    for i in candidates:
        if i not in kept:
            kept.append(i)
        if len(kept) == capacity:
            break
    return torch.tensor(sorted(kept))


# ---------------------------------------------------------------------------------------------- fast paths


def step_scores(layers: Sequence[torch.Tensor], *, prompt_len: int, start_layer: int,
                weighted_query: bool) -> torch.Tensor:
    """Same contract as ``step_scores_reference``; layers of one step share a shape."""
    scored = torch.stack([w[..., :prompt_len].float() for w in layers[start_layer:]])  # [layers, H, Q, L]
    queries = scored.shape[2]
    if weighted_query and queries > 1:
        scored = scored * torch.linspace(0, 1, queries)[None, None, :, None]
    return scored.amax(dim=(0, 1, 2))


def select_tokens(scores: torch.Tensor, *, capacity: int, window: int, kernel: int,
                  neighbours: int) -> torch.Tensor:
    """Same contract as ``select_reference``, without Python loops over tokens."""
    length = scores.shape[-1]
    if capacity >= length:
        return torch.arange(length)
    before = (kernel - 1) // 2
    padded = F.pad(scores.float()[None, None], (before, kernel - 1 - before))  # zero padding, as the paper
    pooled = F.max_pool1d(padded, kernel, stride=1)[0, 0]  # [L]
    ranked = torch.sort(pooled, descending=True, stable=True).indices[:capacity]  # ties: earlier first
    offsets = torch.tensor(neighbour_offsets(neighbours))
    spans = (ranked[:, None] + offsets[None, :]).clamp(0, length - 1).flatten()  # [C * N], in candidate order
    candidates = torch.cat([torch.arange(length - min(window, length), length), spans])
    # first candidate position of each token (absent tokens: len(candidates)); keep the C earliest
    first = torch.full((length,), candidates.numel(), dtype=torch.long)
    first.scatter_reduce_(0, candidates, torch.arange(candidates.numel()), reduce="amin")
    kept = torch.sort(first, stable=True).indices[:capacity]
    return kept.sort().values


def select(scores: torch.Tensor, settings: SpecPCSettings) -> torch.Tensor:
    return select_tokens(scores, capacity=settings.capacity, window=settings.window, kernel=settings.kernel,
                         neighbours=settings.neighbours)
