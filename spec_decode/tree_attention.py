"""Attention for a verification step over a paged KV cache in which some sequences carry a token tree.

A tree sequence's last ``M`` query tokens are the root and the first ``M - 1`` tree nodes (in node order),
written to consecutive cache slots. Each of them attends the whole context before the root, plus only
itself and its ancestors among the tree tokens (``tree_mask[:M, :M]``, a prefix of the tree's mask, is a
tree too: nodes are ordered so that ancestors come first). Other sequences attend causally. Layout as in
``afterburner.attention_backends.selective`` (k_cache [NB, BS, Hkv, D], grouped-query heads).
"""

from __future__ import annotations

import torch

from afterburner.attention_backends.selective import attend, gather_sequence


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
    """``tree_sizes``: sequence index -> M (its tree tokens, root included, = its query length)."""
    out = torch.zeros_like(query)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    group = query.shape[1] // num_kv_heads
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = query_start[b].item(), query_start[b + 1].item()
        n_q = end - start
        if n_q == 0:
            continue
        keys = gather_sequence(k_cache, block_table[b], seq_len).transpose(0, 1).float()  # [Hkv, L, D]
        values = gather_sequence(v_cache, block_table[b], seq_len).transpose(0, 1).float()
        allowed = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - n_q, seq_len)[:, None]  # [n_q, L]
        if b in tree_sizes:
            if tree_sizes[b] != n_q:
                raise ValueError(f"sequence {b}: {n_q} query tokens but a tree of {tree_sizes[b]}")
            allowed[:, seq_len - n_q:] = tree_mask[:n_q, :n_q]
        q = query[start:end].view(n_q, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).float()
        result = attend(q, keys.unsqueeze(1), values.unsqueeze(1), allowed, scale)  # [Hkv, G, n_q, D]
        out[start:end] = result.permute(2, 0, 1, 3).reshape(n_q, -1, head_dim).to(out.dtype)
    return out
