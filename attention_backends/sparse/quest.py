"""Quest-style query-aware block selection (Tang et al., "Quest: Query-Aware Sparsity for Efficient
Long-Context LLM Inference", ICML 2024).

Each physical KV block keeps a channel-wise summary of its keys: min_d and max_d over the block's tokens,
per kv head. For a query q, sum_d max(q_d * min_d, q_d * max_d) is an upper bound on q.k for every key k
in the block (each term bounds q_d * k_d since k_d lies in [min_d, max_d]). Blocks with the highest bounds
are the ones that can hold large attention weights, so attention reads only those, within a token budget,
always keeping the first blocks (attention sinks) and the most recent ones.

Summaries are keyed by physical block id and kept current from the cache writes themselves
(``update_summaries`` with the step's slot mapping): a block that is written at offset 0 starts over, so a
freed and reused block never carries stale keys; a prefix-cached block is never rewritten, so its summary
stays valid for every request that shares it.

Summaries may be stored as bfloat16 at half the bytes (scoring reads every one of them each step): each
is rounded outward (``bf16_outward``: max up, min down), so the bound stays an upper bound, a little looser.

Shapes: kmin, kmax [NB, Hkv, D] (one per physical block); query [n_q, Hq, D]; scores [Hkv, n_blocks].
"""

from __future__ import annotations

import math

import torch


def empty_summaries(num_blocks: int, num_kv_heads: int, head_dim: int, dtype=torch.float32):
    """(kmin, kmax) filled with +inf / -inf: a block with no keys bounds nothing."""
    kmin = torch.full((num_blocks, num_kv_heads, head_dim), math.inf, dtype=dtype)
    return kmin, -kmin.clone()


def bf16_outward(x: torch.Tensor, *, up: bool) -> torch.Tensor:
    """x as bfloat16 rounded toward +inf (``up``) or -inf. bfloat16 is float32's top 16 bits: truncating
    moves toward zero, so a value that loses bits steps one unit away from zero when that is the way asked."""
    bits = x.float().contiguous().view(torch.int32)
    lost = (bits & 0xFFFF) != 0
    away = lost & ((x > 0) if up else (x < 0))
    return ((bits & -0x10000) + away.to(torch.int32) * 0x10000).view(torch.float32).to(torch.bfloat16)


def update_summaries(kmin: torch.Tensor, kmax: torch.Tensor, key: torch.Tensor, slot_mapping: torch.Tensor,
                     block_size: int) -> None:
    """Fold this step's keys [N, Hkv, D], written at ``slot_mapping`` [N] (block * BS + offset; negative:
    padding, skipped), into the summaries, in place. Only the blocks written are read and written back
    (a scatter into the whole table costs a pass over it: milliseconds per layer for a decode step)."""
    valid = slot_mapping >= 0
    slots, key = slot_mapping[valid].long(), key[valid]
    if slots.numel() == 0:
        return
    if kmin.dtype == torch.bfloat16:
        key_lo, key_hi = bf16_outward(key, up=False), bf16_outward(key, up=True)
    else:
        key_lo = key_hi = key.to(kmin.dtype)
    blocks, inverse = torch.unique(torch.div(slots, block_size, rounding_mode="floor"), return_inverse=True)
    restarted = torch.zeros(blocks.shape[0], dtype=torch.bool)
    restarted[inverse[slots % block_size == 0]] = True
    lo, hi = kmin[blocks], kmax[blocks]
    lo[restarted], hi[restarted] = math.inf, -math.inf
    index = inverse[:, None, None].expand_as(key)
    kmin[blocks] = lo.scatter_reduce_(0, index, key_lo, reduce="amin")
    kmax[blocks] = hi.scatter_reduce_(0, index, key_hi, reduce="amax")


def summaries_from_cache(k_cache: torch.Tensor, fill: torch.Tensor):
    """Reference: summaries recomputed from the cache [NB, BS, Hkv, D], ``fill`` [NB] tokens per block."""
    kmin, kmax = empty_summaries(k_cache.shape[0], k_cache.shape[2], k_cache.shape[3])
    for block, count in enumerate(fill.tolist()):
        if count:
            kmin[block] = k_cache[block, :count].float().amin(0)
            kmax[block] = k_cache[block, :count].float().amax(0)
    return kmin, kmax


def block_scores(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Upper bounds on q.k per kv head and logical block: [Hkv, len(blocks)]. A kv head's bound is the max
    over its query heads and the chunk's query tokens (a block matters if any of them may need it).
    query [n_q, Hq, D]; blocks: the sequence's physical block ids in logical order."""
    lo, hi = kmin[blocks.long()], kmax[blocks.long()]  # [n, Hkv, D]
    n_q, num_heads, head_dim = query.shape
    num_kv_heads = lo.shape[1]
    q = query.float().view(n_q, num_kv_heads, num_heads // num_kv_heads, head_dim)
    bound = torch.maximum(q[:, None] * lo[None, :, :, None], q[:, None] * hi[None, :, :, None]).sum(-1)
    return bound.amax(dim=(0, 3)).transpose(0, 1)  # [n_q, n, Hkv, G] -> [Hkv, n]


def budget_blocks(seq_len: int, block_size: int, *, budget_ratio: float, token_budget: int | None) -> int:
    """Blocks to read for a sequence: the token budget (absolute, else a ratio of the length), rounded up."""
    tokens = token_budget if token_budget is not None else math.ceil(budget_ratio * seq_len)
    return max(1, math.ceil(tokens / block_size))


def select_blocks(scores: torch.Tensor, *, budget: int, sink_blocks: int, recent_blocks: int) -> torch.Tensor:
    """[Hkv, n] scores -> [Hkv, n] bool: the first ``sink_blocks`` and last ``recent_blocks`` always, then
    the highest-scoring others until ``budget`` blocks (at least the sinks and recents; all if n <= budget)."""
    num_kv_heads, n = scores.shape
    mask = torch.zeros(num_kv_heads, n, dtype=torch.bool)
    if n <= budget:
        return mask.fill_(True)
    mask[:, :sink_blocks] = True
    if recent_blocks:
        mask[:, max(0, n - recent_blocks):] = True
    room = budget - int(mask[0].sum())
    if room > 0:
        free = scores.masked_fill(mask, -math.inf)
        top = torch.topk(free, min(room, n - int(mask[0].sum())), dim=1).indices
        mask.scatter_(1, top, True)
    return mask


def choose_pages(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, pages: torch.Tensor, *,
                 seq_len: int, page_size: int, budget_ratio: float, token_budget: int | None, sink_pages: int,
                 recent_pages: int) -> torch.Tensor:
    """The pages one decode query reads: [Hkv, len(pages)] bool from its Quest bounds over ``pages`` (the
    sequence's physical page ids in logical order) within the budget, with at least one recent page (the
    last page holds the query's own key). The engine adapters' sparse settings map onto the keywords."""
    scores = block_scores(query, kmin, kmax, pages)
    budget = budget_blocks(seq_len, page_size, budget_ratio=budget_ratio, token_budget=token_budget)
    return select_blocks(scores, budget=budget, sink_blocks=sink_pages, recent_blocks=max(1, recent_pages))
