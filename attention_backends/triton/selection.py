"""Selected blocks as padded index lists, the form the Triton decode kernel reads.

    block_ids  [B, Hkv, W] int32   logical block ids that (sequence, kv head) reads, -1 = padding

Why indices and not the [B, Hkv, MB] bool mask: a kernel walking a mask visits every logical block of the
context (8k iterations at 128k tokens / 16-token blocks) to read a few; a list lets each program loop over
exactly W entries, and lets split-K cut the selected blocks (not the context) into equal shares. Padding
may sit anywhere in a row (the kernel masks it); it costs a loop iteration but no memory traffic, so keep
W close to the budget. Both functions are pure torch, fixed-shape, and run on whatever device the input is.
"""

from __future__ import annotations

import torch


def _num_blocks(seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    return torch.div(seq_lens + block_size - 1, block_size, rounding_mode="floor")


def mask_to_indices(block_mask: torch.Tensor, seq_lens: torch.Tensor, block_size: int, *,
                    width: int | None = None) -> torch.Tensor:
    """[B, Hkv, MB] bool -> [B, Hkv, W] int32: each row's selected blocks below the sequence's block count,
    ascending, then -1. ``width`` None: the largest selected count (one device-to-host sync); rows with
    more selected blocks than ``width`` are cut (keep their lowest ids), so pass at least the budget."""
    max_blocks = block_mask.shape[-1]
    positions = torch.arange(max_blocks, device=block_mask.device)
    valid = block_mask & (positions < _num_blocks(seq_lens, block_size)[:, None, None])
    # Unselected blocks sort after every selected one; their sort key max_blocks becomes the padding.
    keys = torch.where(valid, positions, max_blocks)
    if width is None:
        width = max(1, int(valid.sum(-1).max().item()))
    ids = torch.sort(keys, dim=-1).values[..., :width]
    if ids.shape[-1] < width:  # asked for more than the table is wide: pad
        ids = torch.nn.functional.pad(ids, (0, width - ids.shape[-1]), value=max_blocks)
    return torch.where(ids == max_blocks, -1, ids).to(torch.int32)


def indices_to_mask(block_ids: torch.Tensor, max_blocks: int) -> torch.Tensor:
    """[B, Hkv, W] int (-1 padding) -> [B, Hkv, max_blocks] bool; the inverse view, for tests and metrics."""
    mask = torch.zeros(*block_ids.shape[:-1], max_blocks + 1, dtype=torch.bool, device=block_ids.device)
    mask.scatter_(-1, torch.where(block_ids < 0, max_blocks, block_ids).long(), True)
    return mask[..., :max_blocks]


def topk_block_indices(scores: torch.Tensor, seq_lens: torch.Tensor, block_size: int, *, budget: int,
                       sink_blocks: int, recent_blocks: int) -> torch.Tensor:
    """Quest's ``select_blocks`` for the whole batch at once: scores [B, Hkv, MB] -> block_ids [B, Hkv, W]
    with W = min(MB, max(budget, sink_blocks + recent_blocks)). Sinks and recents always, then the
    highest-scoring others; a sequence of at most W blocks reads all of them (the rest is -1). Unsorted."""
    max_blocks = scores.shape[-1]
    n_blocks = _num_blocks(seq_lens, block_size)[:, None, None]  # [B, 1, 1]
    positions = torch.arange(max_blocks, device=scores.device)
    forced = (positions < sink_blocks) | (positions >= n_blocks - recent_blocks)
    key = torch.where(forced, torch.inf, scores.float())
    key = torch.where(positions < n_blocks, key, -torch.inf)  # past the end: picked only to pad
    width = min(max_blocks, max(budget, sink_blocks + recent_blocks))
    ids = torch.topk(key, width, dim=-1).indices
    return torch.where(ids < n_blocks, ids, -1).to(torch.int32)
