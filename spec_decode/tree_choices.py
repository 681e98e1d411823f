"""Token-tree shapes as data (``tree.py``). A tree is a list of paths; path (r_1, ..., r_d) is the node
reached by taking the r_1-th candidate at depth 1, then the r_2-th at depth 2, ... (ranks from 0, best
first). For Medusa, depth d is head d."""

from __future__ import annotations

from afterburner.spec_decode.tree_plan import Acceptance

# The sparse tree of the Medusa paper and its reference implementation ("mc_sim_7b_63": 63 nodes, depth 4,
# up to 10 candidates per head), chosen there by simulating acceptance on Vicuna-7B.
MC_SIM_7B_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5],
    [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8],
    [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0],
    [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0],
    [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1],
    [9, 0], [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0],
]


def chain(depth: int) -> list[list[int]]:
    """The argmax chain (what vLLM's built-in proposers draft): one candidate per depth."""
    return [[0] * d for d in range(1, depth + 1)]


def tree_paths(tree: str | list[list[int]], *, max_depth: int, num_drafts: int,
               measured: Acceptance | None = None) -> list[list[int]]:
    """The paths a proposer drafts ``num_drafts`` tokens for. ``"paper"``: the first ``num_drafts`` paths
    of MC_SIM_7B_63 (listed best first, each path after its prefixes) no deeper than ``max_depth``;
    ``"chain"``: the argmax chain; ``"measured"``: the ``num_drafts`` paths accepted most often on the
    drafter's held-out data (``measured``, ``tree_plan``); a list: those paths, which must number
    ``num_drafts``. ``ValueError`` names what does not fit."""
    if tree == "measured":
        if measured is None:
            raise ValueError('"measured" needs Medusa heads trained by `afterburner train medusa` (their '
                             "config.json carries the held-out acceptance); on vLLM only")
        paths = measured.tree(num_drafts, max_depth=max_depth)
        if num_drafts > len(paths):
            raise ValueError(f"only {len(paths)} paths within depth {max_depth} were ever accepted on the heads' "
                             f"held-out data ({measured.positions} positions); num_speculative_tokens is "
                             f"{num_drafts}")
        return paths
    if tree == "chain":
        if num_drafts > max_depth:
            raise ValueError(f"a chain drafts at most one token per depth: {num_drafts} > depth {max_depth}")
        return chain(num_drafts)
    if tree == "paper":
        paths = [p for p in MC_SIM_7B_63 if len(p) <= max_depth]
        if num_drafts > len(paths):
            raise ValueError(f"the paper's tree has {len(paths)} nodes within depth {max_depth}; "
                             f"num_speculative_tokens is {num_drafts}")
        return paths[:num_drafts]
    if len(tree) != num_drafts:
        raise ValueError(f"the tree has {len(tree)} nodes but num_speculative_tokens is {num_drafts}: "
                         "they must be equal (one drafted token per node)")
    return [list(p) for p in tree]
