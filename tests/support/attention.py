"""Inputs and the oracle for attention tests: a paged KV cache holding sequences in shuffled physical
blocks (``make_batch``), and torch SDPA spelled out per sequence (``sdpa`` for one sequence's contiguous
keys, ``paged_sdpa`` for a paged batch), with the causal mask and any selection mask made explicit.

Shapes: queries [tokens, Hq, D]; keys and values [L, Hkv, D]; caches [blocks, block_size, Hkv, D]; GQA
maps query head h to kv head h // (Hq // Hkv). Deliberately independent of the code under test."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def make_batch(seed, *, seq_lens, q_lens, block_size, num_heads, num_kv_heads, head_dim, spare_blocks=3,
               dtype=torch.float32, device="cpu"):
    """A paged cache holding len(seq_lens) sequences in shuffled physical blocks, plus their queries.

    Returns (query [sum(q_lens), Hq, D], k_cache, v_cache [num_blocks, block_size, Hkv, D], block table
    [B, max blocks] int32, seq_lens [B] int64, query_start [B + 1] int64); sequence b's queries are its
    last q_lens[b] positions. Values are drawn in fp32 from one generator seeded with ``seed`` on
    ``device`` (so a seed gives the same batch on every call), then cast to ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen, device=device)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen, device=device)
    perm = torch.randperm(num_blocks, generator=gen, device=device)
    table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32, device=device)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        table[b, :n] = perm[used:used + n].int()
        used += n
    query_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], device=device)
    query = torch.randn(int(query_start[-1]), num_heads, head_dim, generator=gen, device=device)
    return (query.to(dtype), k_cache.to(dtype), v_cache.to(dtype), table, torch.tensor(seq_lens, device=device),
            query_start)


def gather(cache, table_row, seq_len):
    """One sequence's first ``seq_len`` token slots of a paged cache, in order: [seq_len, Hkv, D]."""
    n_blocks = math.ceil(seq_len / cache.shape[1])
    return cache[table_row[:n_blocks].long()].flatten(0, 1)[:seq_len]


def per_sequence(op, query, k_cache, v_cache, table, seq_lens, query_start, **kwargs):
    """``op(queries [n_q, Hq, D], keys, values [L, Hkv, D], **kwargs) -> [n_q, Hq, D]`` on each sequence of
    a paged batch laid out as ``make_batch`` returns it, over its contiguous keys: [T, Hq, D] float64 (an
    oracle's precision). Sequences with no query this step are skipped."""
    out = torch.zeros_like(query, dtype=torch.float64)
    for b, n in enumerate(seq_lens.tolist()):
        s, e = int(query_start[b]), int(query_start[b + 1])
        if e > s:
            out[s:e] = op(query[s:e], gather(k_cache, table[b], n), gather(v_cache, table[b], n), **kwargs)
    return out


def sdpa(query, keys, values, *, scale, causal=True, first_key=0, mask=None):
    """torch SDPA of queries [n_q, Hq, D] over one sequence's keys and values [L, Hkv, D]: [n_q, Hq, D].

    causal: the queries are the sequence's last n_q positions and each reads the keys up to its own
    (False: every key, e.g. for a tree mask given as ``mask``). first_key: only keys from that position on
    are read (a suffix). mask: bool, broadcastable to [Hq, n_q, L]; a key is read where it is True too.
    A query that may read no key gets NaN (as SDPA gives): callers keep at least one key per query."""
    seq_len, n_q, num_heads = keys.shape[0], query.shape[0], query.shape[1]
    group = num_heads // keys.shape[1]
    positions = torch.arange(seq_len, device=keys.device)
    allowed = (positions >= first_key)[None, None, :]
    if causal:
        own = torch.arange(seq_len - n_q, seq_len, device=keys.device)
        allowed = allowed & (positions[None, :] <= own[:, None])[None]
    if mask is not None:
        allowed = allowed & mask.to(keys.device)
    allowed = allowed.expand(num_heads, n_q, seq_len)
    k = keys.transpose(0, 1).repeat_interleave(group, 0)  # [Hq, L, D]
    v = values.transpose(0, 1).repeat_interleave(group, 0)
    out = F.scaled_dot_product_attention(query.transpose(0, 1), k, v, attn_mask=allowed, scale=scale)
    return out.transpose(0, 1)


def paged_sdpa(query, k_cache, v_cache, table, seq_lens, query_start, *, scale, block_mask=None,
               token_mask=None):
    """``sdpa`` (causal) per sequence of a paged batch laid out as ``make_batch`` returns it: [T, Hq, D].

    block_mask [B, Hkv, max blocks] / token_mask [B, Hkv, >= L] (bool): each kv head reads only the keys
    of its selected blocks / tokens (with both, the keys both select), and its query heads with it."""
    out = torch.zeros_like(query)
    block_size, group = k_cache.shape[1], query.shape[1] // k_cache.shape[2]
    for b, n in enumerate(seq_lens.tolist()):
        s, e = int(query_start[b]), int(query_start[b + 1])
        keep = torch.ones(k_cache.shape[2], n, dtype=torch.bool, device=query.device)  # [Hkv, L]
        if block_mask is not None:
            keep = keep & block_mask[b][:, torch.arange(n, device=block_mask.device) // block_size].to(keep.device)
        if token_mask is not None:
            keep = keep & token_mask[b, :, :n].to(keep.device)
        out[s:e] = sdpa(query[s:e], gather(k_cache, table[b], n), gather(v_cache, table[b], n), scale=scale,
                        mask=keep.repeat_interleave(group, 0)[:, None, :])
    return out
