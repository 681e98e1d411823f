"""How block-level sparse attention sees SGLang's token-level KV pool.

SGLang (0.5.23) keeps each layer's K and V as rows [num_slots, Hkv, D], one per token slot, and maps
position p of the request in req_to_token_pool row r to slot ``req_to_token[r, p]``. With page_size 1
consecutive positions may sit in any slots; with page_size P a page holds P consecutive positions.
There are no physical blocks to key Quest's summaries by, so:

- A *block* is BS consecutive positions of one request: block j holds positions [j * BS, (j + 1) * BS).
  BS is the smallest multiple of page_size that is at least ``MIN_BLOCK_TOKENS``, so every block starts
  on a page boundary.
- A block's summary lives in *row* ``req_to_token[r, j * BS] // page_size``: the page of its first token.
  Live blocks with different first slots get different rows. Requests that share a radix-cache prefix
  share its slots, so a block that starts inside the shared prefix has one row for all of them.
- A write of position p of request r is folded in at the *virtual slot* ``row * BS + p % BS``, so
  ``quest.update_summaries`` applies unchanged: a write at offset 0 restarts the row.

Why the summaries stay valid bounds: a row restarts only when a freshly allocated slot becomes a block's
first token. A shared first slot belongs to a cached prefix, which is never written again. So a row keeps
the min/max over every key written into any block that starts at that slot since the slot was allocated:
all of each sharing request's keys in that block, and sometimes more (requests that diverge inside the
block, or tokens the radix cache has since evicted). That makes the bound looser, never wrong. A freed slot
leaves a stale row that is never read: the slot is read as a block start again only after its offset-0 write.

For reading, the selective op sees the pool as num_slots blocks of one slot each: the block table is
request r's req_to_token row and the mask is the block mask repeated per position (``token_mask``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Quest's page size (Tang et al. 2024, Sec. 4): large enough that a block's min/max bound stays
# informative, small enough that a quarter budget still leaves the selection room to choose. The sparse
# method takes its own (``attention.sparse.page_size``).
MIN_BLOCK_TOKENS = 16


def block_tokens(page_size: int, min_tokens: int = MIN_BLOCK_TOKENS) -> int:
    """The smallest multiple of SGLang's ``page_size`` that is at least ``min_tokens``."""
    return page_size * math.ceil(min_tokens / page_size)


@dataclass(frozen=True)
class StepBlocks:
    """One forward step's view of the pool, built once per step and shared by every layer.

    write_slots   [N] int64    virtual slot (row * BS + offset) of each token this step writes,
                               in ``out_cache_loc`` order
    token_table   [B, Lmax]    slot of every position of each request (req_to_token rows); decode only
    block_rows    [B, Bmax]    summary row of every block of each request; decode only
    seq_lens      list[int]    tokens in each request, this step's included
    """

    write_slots: torch.Tensor
    token_table: torch.Tensor | None
    block_rows: torch.Tensor | None
    seq_lens: list[int]


def written_positions(*, decode: bool, req_pool_indices: torch.Tensor, seq_lens: list[int],
                      prefix_lens: list[int] | None, extend_lens: list[int] | None):
    """(request row, position) of each token a step writes, in ``out_cache_loc`` order: [N], [N].
    Decode writes each request's last position; extend writes positions [prefix, prefix + extend)."""
    device = req_pool_indices.device
    if decode:
        return req_pool_indices.long(), torch.tensor(seq_lens, dtype=torch.long, device=device) - 1
    counts = torch.tensor(extend_lens, dtype=torch.long, device=device)
    rows = torch.repeat_interleave(req_pool_indices.long(), counts)
    positions = torch.cat([torch.arange(p, p + n) for p, n in zip(prefix_lens, extend_lens, strict=False)])
    return rows, positions.to(device)


def plan_step(*, req_to_token: torch.Tensor, page_size: int, decode: bool, req_pool_indices: torch.Tensor,
              seq_lens: list[int], prefix_lens: list[int] | None = None, extend_lens: list[int] | None = None,
              block_size: int | None = None) -> StepBlocks:
    """``block_size``: BS, a multiple of ``page_size`` (default ``block_tokens(page_size)``)."""
    bs = block_size or block_tokens(page_size)
    rows, positions = written_positions(decode=decode, req_pool_indices=req_pool_indices, seq_lens=seq_lens,
                                        prefix_lens=prefix_lens, extend_lens=extend_lens)
    offsets = positions % bs
    first_slots = req_to_token[rows, positions - offsets].long()
    write_slots = torch.div(first_slots, page_size, rounding_mode="floor") * bs + offsets
    token_table = block_rows = None
    if decode:
        token_table = req_to_token[req_pool_indices.long(), : max(seq_lens)].long()  # [B, Lmax]
        block_rows = torch.div(token_table[:, ::bs], page_size, rounding_mode="floor")  # [B, ceil(Lmax / BS)]
    return StepBlocks(write_slots=write_slots, token_table=token_table, block_rows=block_rows, seq_lens=seq_lens)


def token_mask(block_mask: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """[B, Hkv, Bmax] -> [B, Hkv, length]: each position takes its block's choice."""
    return block_mask.repeat_interleave(block_size, dim=2)[:, :, :length]
