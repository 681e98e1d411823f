"""Attention over a selected subset of a paged KV cache: the op that the sparse and squeezed backends share.

Layout (the engine adapters view their caches this way):
    query        [T, Hq, D]          the step's query tokens, sequences back to back
    k_cache      [NB, BS, Hkv, D]    physical blocks of BS token slots; v_cache the same
    block_table  [B, MB] int         physical block of each logical block of each sequence
    seq_lens     [B] int             tokens in each sequence, this step's included
    query_start  [B + 1] int         sequence b's queries are query[query_start[b]:query_start[b + 1]];
                                     they are its last positions (decode: 1 token, prefill chunk: several)
    block_mask   [B, Hkv, MB] bool   which logical blocks each kv head may read (None: all)
    token_mask   [B, Hkv, L] bool    which logical token positions each kv head may read (None: all;
                                     L >= every seq_len); a key is read where both masks allow it

    tree_mask    [N, N] bool         with tree_sizes {b: M}: sequence b's M queries verify a token tree
                                     (root first, nodes in order, ancestors first); query i of them reads
                                     the context before the root and the tree rows tree_mask[i, :M] marks
                                     (its ancestors and itself) instead of the causal rows

Query head h reads kv head h // (Hq // Hkv) (grouped-query attention). A query at position p attends the
keys at positions <= p (a tree row: as above) that lie in selected blocks (and, with a token mask, at
selected positions); its output is softmax(scale * q.k) v over them. Block masks suit block-granular
policies (Quest); token masks suit policies that pick individual keys (Squeezed Attention's clusters).

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


def visible(positions: torch.Tensor, seq_len: int, n_q: int, tree_mask: torch.Tensor | None = None,
            tree_size: int | None = None) -> torch.Tensor:
    """[n_q, P] bool: which of ``positions`` [P] each of a sequence's last ``n_q`` queries may read: causally,
    or as the rows of a token tree of ``tree_size`` nodes (the context before the root, then its ancestors
    and itself by ``tree_mask``)."""
    first = seq_len - n_q
    allowed = (positions[None, :] <= torch.arange(first, seq_len)[:, None]) & (positions[None, :] < seq_len)
    if tree_size is None:
        return allowed
    if tree_size != n_q:
        raise ValueError(f"{n_q} query tokens but a tree of {tree_size}")
    inside = (positions >= first) & (positions < seq_len)
    ancestors = tree_mask[:n_q, (positions - first).clamp(0, n_q - 1)]
    return torch.where(inside[None, :], ancestors, allowed)


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
    token_mask: torch.Tensor | None = None,
    tree_mask: torch.Tensor | None = None,
    tree_sizes: dict[int, int] | None = None,
) -> torch.Tensor:
    out = torch.zeros_like(query)
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = query.shape[1] // num_kv_heads
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = query_start[b].item(), query_start[b + 1].item()
        keys = gather_sequence(k_cache, block_table[b], seq_len).float()  # [L, Hkv, D]
        values = gather_sequence(v_cache, block_table[b], seq_len).float()
        positions = torch.arange(seq_len)
        rows = visible(positions, seq_len, end - start, tree_mask, (tree_sizes or {}).get(b))
        for i in range(end - start):
            for h in range(query.shape[1]):
                kv = h // group
                allowed = rows[i].clone()
                if block_mask is not None:
                    allowed &= block_mask[b, kv, positions // block_size]
                if token_mask is not None:
                    allowed &= token_mask[b, kv, :seq_len]
                if not allowed.any():
                    continue
                scores = (keys[allowed, kv] @ query[start + i, h].float()) * scale
                out[start + i, h] = (torch.softmax(scores, 0) @ values[allowed, kv]).to(out.dtype)
    return out


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, scale: float):
    """q [..., n_q, D], keys / values [..., L, D], allowed [n_q, L] (broadcast) -> [..., n_q, D]."""
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0)  # no key: read nothing
    return torch.matmul(probs, values.float())


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
    token_mask: torch.Tensor | None = None,
    tree_mask: torch.Tensor | None = None,
    tree_sizes: dict[int, int] | None = None,
) -> torch.Tensor:
    """Batched torch path, same signature and result as the reference. Without a mask, one matmul per
    sequence over its gathered blocks; with one, per sequence and kv head, only the selected blocks are
    gathered (that is where the saving in KV reads comes from); with a token mask, a block none of whose
    tokens is selected is not gathered either."""
    out = torch.zeros_like(query)
    block_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    group = query.shape[1] // num_kv_heads
    offsets = torch.arange(block_size)
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = query_start[b].item(), query_start[b + 1].item()
        n_q = end - start
        if n_q == 0:
            continue
        q = query[start:end].view(n_q, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, n_q, D]
        tree_size = (tree_sizes or {}).get(b)
        n_blocks = math.ceil(seq_len / block_size)
        if block_mask is None and token_mask is None:
            keys = gather_sequence(k_cache, block_table[b], seq_len).transpose(0, 1)  # [Hkv, L, D]
            values = gather_sequence(v_cache, block_table[b], seq_len).transpose(0, 1)
            allowed = visible(torch.arange(seq_len), seq_len, n_q, tree_mask, tree_size)
            result = attend(q, keys.unsqueeze(1), values.unsqueeze(1), allowed, scale)  # [Hkv, G, n_q, D]
        else:
            result = torch.zeros(num_kv_heads, group, n_q, head_dim)
            blocks = torch.ones(num_kv_heads, n_blocks, dtype=torch.bool)  # [Hkv, n_blocks]
            if block_mask is not None:
                blocks &= block_mask[b, :, :n_blocks]
            if token_mask is not None:  # tokens padded to whole blocks: a block with none selected is skipped
                tokens = torch.zeros(num_kv_heads, n_blocks * block_size, dtype=torch.bool)
                tokens[:, :seq_len] = token_mask[b, :, :seq_len]
                blocks &= tokens.view(num_kv_heads, n_blocks, block_size).any(-1)
            for kv in range(num_kv_heads):
                logical = torch.nonzero(blocks[kv]).flatten()
                physical = block_table[b, logical].long()
                keys = k_cache[physical, :, kv].reshape(-1, head_dim)  # [n_sel * BS, D]
                values = v_cache[physical, :, kv].reshape(-1, head_dim)
                positions = (logical[:, None] * block_size + offsets[None, :]).flatten()
                allowed = visible(positions, seq_len, n_q, tree_mask, tree_size)
                if token_mask is not None:
                    allowed &= tokens[kv, positions]
                result[kv] = attend(q[kv], keys, values, allowed, scale)
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
