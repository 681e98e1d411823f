"""Token-tree buffers for speculative verification: one pass of the target model over the root (the last
accepted token) and every tree node, each node attending only to its ancestors. Any proposer that drafts
top-k candidates per depth (Medusa heads, a draft model, a micro-step drafter) fills such a tree.

A tree is a set of paths; path (r_1, ..., r_d) is the node reached by taking the r_1-th candidate at depth
1, then the r_2-th at depth 2, ... (ranks from 0, best first). ``tree_choices.py`` names the shapes.

Nodes are numbered 0 (root) .. N in the order of ``sorted(choices, key=(depth, path))``. Buffers:
    attn_mask        [N+1, N+1] bool  node i may attend node j iff j is i or an ancestor of i
    position_offsets [N+1] long       depth of each node (root 0): its position after the root's
    candidate_index  [N+1] long       where each node's token sits in the flattened candidates
                                      [root token, depth-1 top-k, depth-2 top-k, ...]: 0 for the root,
                                      1 + (d - 1) * topk + r_d for node (r_1, ..., r_d)
    retrieve_indices [P, D+1] long    every root-to-leaf path as node indices, padded with -1
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class TokenTree:
    choices: tuple[tuple[int, ...], ...]
    topk: int
    attn_mask: torch.Tensor
    position_offsets: torch.Tensor
    candidate_index: torch.Tensor
    retrieve_indices: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return len(self.choices) + 1

    @property
    def depth(self) -> int:
        return max(len(c) for c in self.choices)


def build_tree(choices: Sequence[Sequence[int]], *, max_depth: int, topk: int | None = None) -> TokenTree:
    """Buffers for ``choices``; ``ValueError`` naming the problem for trees the drafter cannot fill
    (``max_depth``: how deep it drafts, e.g. Medusa's number of heads; ``topk``: candidates per depth)."""
    paths = sorted({tuple(c) for c in choices}, key=lambda c: (len(c), c))
    if not paths or any(len(c) == 0 for c in paths):
        raise ValueError("token tree: give at least one non-empty path")
    if any(r < 0 for c in paths for r in c):
        raise ValueError("token tree: ranks must be >= 0")
    depth = max(len(c) for c in paths)
    if depth > max_depth:
        raise ValueError(f"the tree is {depth} deep but the drafter reaches only depth {max_depth}")
    needed = max(r for c in paths for r in c) + 1
    topk = needed if topk is None else topk
    if needed > topk:
        raise ValueError(f"the tree uses candidate rank {needed - 1} but the drafter keeps only top-{topk}")
    index = {c: i + 1 for i, c in enumerate(paths)}
    missing = [c[:k] for c in paths for k in range(1, len(c)) if c[:k] not in index]
    if missing:
        raise ValueError(f"token tree: path {list(missing[0])} is missing (every prefix of a path must be a node)")

    n = len(paths) + 1
    attn_mask = torch.eye(n, dtype=torch.bool)
    attn_mask[:, 0] = True
    positions = torch.zeros(n, dtype=torch.long)
    candidates = torch.zeros(n, dtype=torch.long)
    for path, i in index.items():
        positions[i] = len(path)
        candidates[i] = 1 + (len(path) - 1) * topk + path[-1]
        for k in range(1, len(path)):
            attn_mask[i, index[path[:k]]] = True
    leaves = [c for c in paths if not any(len(o) > len(c) and o[: len(c)] == c for o in paths)]
    retrieve = torch.full((len(leaves), depth + 1), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        retrieve[row, : len(leaf) + 1] = torch.tensor([0] + [index[leaf[:k]] for k in range(1, len(leaf) + 1)])
    return TokenTree(tuple(paths), topk, attn_mask, positions, candidates, retrieve)


def children(tree: TokenTree) -> tuple[tuple[int, ...], ...]:
    """Each node's children, best rank first (the walk of a rule that accepts node by node)."""
    return _children(tree.choices)


@functools.lru_cache(maxsize=64)
def _children(choices: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    index = {path: i + 1 for i, path in enumerate(choices)}
    kids: list[list[int]] = [[] for _ in range(len(choices) + 1)]
    for path, i in index.items():  # choices are sorted by (depth, path): siblings arrive best rank first
        kids[index.get(path[:-1], 0)].append(i)
    return tuple(tuple(k) for k in kids)


def tree_candidates(tree: TokenTree, root_token: int, head_topk: torch.Tensor) -> torch.Tensor:
    """The token of every node [N+1]: head_topk [depth, topk] holds the best tokens at each depth."""
    flat = torch.cat([torch.tensor([root_token]), head_topk[:, : tree.topk].flatten()])
    return flat[tree.candidate_index]


def paths_tokens(tree: TokenTree, node_tokens: torch.Tensor) -> torch.Tensor:
    """[P, D+1] tokens along each root-to-leaf path, -1 where a path is shorter."""
    padded = torch.cat([node_tokens, torch.tensor([-1])])
    return padded[tree.retrieve_indices]  # index -1 picks the appended -1
