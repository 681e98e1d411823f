"""A token tree and its size chosen from measured acceptance and measured verification cost.

Acceptance: for each held-out position, ``ranks[p, d]`` is where the target's own token at depth d + 1
stands among depth d + 1's candidates (0 = the drafter's best; ``ranks.max_rank`` or more = not among
the candidates a tree can hold). A node (path r_1..r_d, ``tree_choices``) is accepted at a position
exactly when the position's ranks start with its path, so a tree's accepted drafts per step at that
position is the number of its paths that prefix the position's ranks, with no independence assumption
between depths (the Medusa paper multiplies per-head accuracies instead). The best tree of N nodes is
then the N most frequent rank prefixes: a prefix is at least as frequent as any path extending it, so
the set is a tree (ties go to the shorter, then the lexicographically smaller path).

Cost: verification step time measured per tree size (an engine run, ``benchmarks/``), since on a CPU
each carried token costs linear-layer time and a tree adds its own attention; the chosen shape maximises
expected tokens per second, no speculation (one token per plain step) included.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch


def candidate_ranks(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[P, K] rank of ``targets[k, p]`` among ``logits[k, p, :]`` (0 = the argmax; ties count against the
    target, as a drafter's top-k would list the other token first)."""
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits [K, P, V] and targets [K, P]: got {tuple(logits.shape)}, {tuple(targets.shape)}")
    target_logit = logits.gather(-1, targets[..., None].long())
    return (logits >= target_logit).sum(-1).sub_(1).T.contiguous()


@dataclass(frozen=True)
class Acceptance:
    """Rank prefixes with their counts over ``positions`` held-out positions (paths of ranks < max_rank)."""
    counts: dict[tuple[int, ...], int]
    positions: int
    max_rank: int

    @classmethod
    def from_ranks(cls, ranks: torch.Tensor, max_rank: int = 10) -> Acceptance:
        counts: Counter = Counter()
        for row in ranks.tolist():
            path: tuple[int, ...] = ()
            for r in row:
                if r >= max_rank:
                    break
                path += (r,)
                counts[path] += 1
        return cls(dict(counts), int(ranks.shape[0]), max_rank)

    def tree(self, nodes: int, max_depth: int | None = None) -> list[list[int]]:
        """The ``nodes`` most frequent prefixes no deeper than ``max_depth`` (fewer if fewer were ever
        accepted), each after its prefixes."""
        within = [p for p in self.counts if max_depth is None or len(p) <= max_depth]
        best = sorted(within, key=lambda p: (-self.counts[p], len(p), p))[:nodes]
        return [list(p) for p in sorted(best, key=lambda p: (len(p), p))]

    def accepted_per_step(self, paths: list[list[int]]) -> float:
        """Expected tokens a verification step emits with this tree: 1 + accepted drafts per position."""
        return 1 + sum(self.counts.get(tuple(p), 0) for p in paths) / max(self.positions, 1)

    def to_dict(self, nodes: int = 64) -> dict:
        tree = self.tree(nodes)
        return {"positions": self.positions, "max_rank": self.max_rank, "paths": tree,
                "counts": [self.counts[tuple(p)] for p in tree]}

    @classmethod
    def from_dict(cls, data: dict) -> Acceptance:
        return cls({tuple(p): int(c) for p, c in zip(data["paths"], data["counts"], strict=True)},
                   int(data["positions"]), int(data["max_rank"]))


def best_shape(tokens_per_step: dict, step_ms: dict) -> tuple[object, dict]:
    """(the shape, expected tokens per second by shape) for the shapes (any keys: sizes, names) with both
    expected tokens per step and a measured step time; give no speculation 1.0 token per step."""
    rate = {k: tokens_per_step[k] * 1000.0 / ms for k, ms in step_ms.items() if k in tokens_per_step}
    if not rate:
        raise ValueError("no shape has both a measured step time and an expected acceptance")
    return max(rate, key=lambda k: rate[k]), rate
