"""Attention over a selected subset of a paged KV cache: the op that the sparse and squeezed backends share.

Layout (the engine adapters view their caches this way):
    query        [T, Hq, D]          the step's query tokens, sequences back to back
    k_cache      [NB, BS, Hkv, D]    physical blocks of BS token slots; v_cache the same
    block_table  [B, MB] int         physical block of each logical block of each sequence
    seq_lens     [B] int             tokens in each sequence, this step's included
    query_start  [B + 1] int         sequence b's queries are query[query_start[b]:query_start[b + 1]];
                                     they are its last positions (decode: 1 token, prefill chunk: several)
    block_mask   [B, Hkv, MB] bool   which logical blocks each kv head may read (None: all)

Query head h reads kv head h // (Hq // Hkv) (grouped-query attention). A query at position p attends the
keys at positions <= p that lie in selected blocks; its output is softmax(scale * q.k) v over them.

``selective_attention_reference`` states this in the fewest lines (a loop over sequences, gathering each
one's keys); ``selective_attention`` is the batched torch path that vLLM-on-CPU runs, tested against it.
"""

from __future__ import annotations

import math

import torch


def gather_sequence(cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` token slots of one sequence, in order: [seq_len, Hkv, D]."""
    n_blocks = math.ceil(seq_len / cache.shape[1])
    return cache[block_table_row[:n_blocks].long()].flatten(0, 1)[:seq_len]


def selective_attention_reference(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    *,
    scale: float,
    block_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    out = torch.zeros_like(query)
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = query.shape[1] // num_kv_heads
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = query_start[b].item(), query_start[b + 1].item()
        keys = gather_sequence(k_cache, block_table[b], seq_len).float()  # [L, Hkv, D]
        values = gather_sequence(v_cache, block_table[b], seq_len).float()
        positions = torch.arange(seq_len)
        for i, q_pos in enumerate(range(seq_len - (end - start), seq_len)):
            for h in range(query.shape[1]):
                kv = h // group
                allowed = positions <= q_pos
                if block_mask is not None:
                    allowed &= block_mask[b, kv, positions // block_size]
                if not allowed.any():
                    continue
                scores = (keys[allowed, kv] @ query[start + i, h].float()) * scale
                out[start + i, h] = (torch.softmax(scores, 0) @ values[allowed, kv]).to(out.dtype)
    return out


def selective_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    *,
    scale: float,
    block_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batched torch path: per sequence one masked matmul over its gathered blocks (keys stay in the
    cache's dtype until the product). Same signature and result as the reference."""
    out = torch.zeros_like(query)
    block_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    group = query.shape[1] // num_kv_heads
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = query_start[b].item(), query_start[b + 1].item()
        n_q = end - start
        if n_q == 0:
            continue
        keys = gather_sequence(k_cache, block_table[b], seq_len).transpose(0, 1)  # [Hkv, L, D]
        values = gather_sequence(v_cache, block_table[b], seq_len).transpose(0, 1)
        q = query[start:end].view(n_q, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, n_q, D]
        scores = torch.matmul(q.float(), keys.float().unsqueeze(1).transpose(-1, -2)) * scale  # [Hkv,G,n_q,L]
        positions = torch.arange(seq_len)
        allowed = positions[None, :] <= torch.arange(seq_len - n_q, seq_len)[:, None]  # [n_q, L]
        allowed = allowed[None, None].expand(num_kv_heads, 1, n_q, seq_len)
        if block_mask is not None:
            allowed = allowed & block_mask[b][:, positions // block_size][:, None, None, :]
        scores = scores.masked_fill(~allowed, -math.inf)
        probs = torch.softmax(scores, -1).nan_to_num(0.0)  # a row with no allowed key reads nothing
        result = torch.matmul(probs, values.float().unsqueeze(1))  # [Hkv, G, n_q, D]
        out[start:end] = result.permute(2, 0, 1, 3).reshape(n_q, -1, head_dim).to(out.dtype)
    return out


def kv_bytes_read(seq_lens: torch.Tensor, block_mask: torch.Tensor | None, block_size: int, head_dim: int,
                  num_kv_heads: int, dtype_bytes: int) -> int:
    """Bytes of K and V that attention reads for one layer: whole selected blocks (what a paged kernel
    loads), or every token without a mask."""
    if block_mask is None:
        return int(seq_lens.sum().item()) * num_kv_heads * head_dim * dtype_bytes * 2
    n_blocks = torch.div(seq_lens + block_size - 1, block_size, rounding_mode="floor")
    valid = torch.arange(block_mask.shape[-1])[None, :] < n_blocks[:, None]  # [B, MB]
    selected = (block_mask & valid[:, None, :]).sum().item()
    return int(selected) * block_size * head_dim * dtype_bytes * 2
