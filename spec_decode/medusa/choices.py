"""Medusa trees as data. A tree is a list of paths; path (r_1, ..., r_d) is the node reached by taking the
r_1-th candidate of head 1, then the r_2-th candidate of head 2, ... (ranks from 0, best first)."""

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
    """The argmax chain (what vLLM's built-in Medusa drafts): one candidate per head."""
    return [[0] * d for d in range(1, depth + 1)]
