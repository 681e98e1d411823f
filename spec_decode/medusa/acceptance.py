"""Lossless (greedy) acceptance of a verified Medusa tree.

After one base-model pass over the tree, ``target[p, i]`` is the base model's greedy next token after the
root and the first i drafted tokens of path p. Path p's drafts are accepted while they equal those
greedy tokens; the longest accepted path wins (ties: the first), and the base model's next greedy token
after it is the bonus token. The output is token-for-token what greedy decoding without speculation
produces: every accepted token is exactly the greedy token at its position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Accepted:
    path: int  # which root-to-leaf path
    length: int  # drafted tokens accepted (0 .. depth)
    tokens: list[int]  # accepted drafts + the bonus token: length + 1 new tokens


def greedy_accept(paths: torch.Tensor, target: torch.Tensor) -> Accepted:
    """paths [P, D+1]: root token then drafts (-1 padding); target [P, D+1]: the base model's greedy token
    after each prefix of each path (entries under padding are ignored)."""
    drafts = paths[:, 1:]
    matches = (drafts == target[:, :-1]) & (drafts >= 0)
    accepted = matches.long().cumprod(dim=1).sum(dim=1)  # consecutive matches from the start
    best = int(torch.argmax(accepted))  # first path with the most accepted drafts
    length = int(accepted[best])
    tokens = drafts[best, :length].tolist() + [int(target[best, length])]
    return Accepted(best, length, tokens)
