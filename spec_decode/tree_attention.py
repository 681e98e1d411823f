"""Attention for a verification step over a paged KV cache in which some sequences carry a token tree.

A tree sequence's last ``M`` query tokens are the root and the first ``M - 1`` tree nodes (in node order),
written to consecutive cache slots. Each of them attends the whole context before the root, plus only
itself and its ancestors among the tree tokens (``tree_mask[:M, :M]``, a prefix of the tree's mask, is a
tree too: nodes are ordered so that ancestors come first). Other sequences attend causally. Layout as in
``afterburner.attention_backends.selective`` (k_cache [NB, BS, Hkv, D], grouped-query heads).
"""

from __future__ import annotations

import torch

from afterburner.attention_backends.selective import selective_attention


def tree_verify_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    *,
    scale: float,
    tree_mask: torch.Tensor,
    tree_sizes: dict[int, int],
) -> torch.Tensor:
    """``tree_sizes``: sequence index -> M (its tree tokens, root included, = its query length). The
    selective op's tree rows over every key (``selective.visible``)."""
    return selective_attention(query, k_cache, v_cache, block_table, seq_lens, query_start, scale=scale,
                               tree_mask=tree_mask, tree_sizes=tree_sizes)
