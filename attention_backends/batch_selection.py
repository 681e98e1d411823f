"""A decode batch's selection: each long sequence asks the selector, short ones read everything; the
answers become one token mask for the selective op, and what it reads is counted.

Counting: a position is read if its kv head's mask selects it; a page is read if any of its positions
is. Both are summed over kv heads (``pages_in_context`` / ``tokens_in_context``: what dense would read).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from afterburner.attention_backends.rules import DenseGate
from afterburner.attention_backends.selector import KVSelector, SequenceKV


@dataclass(frozen=True)
class ReadCounts:
    pages_in_context: int
    pages_read: int
    tokens_in_context: int
    tokens_read: int


def count_reads(token_mask: torch.Tensor, seq_lens: Sequence[int], page_size: int) -> ReadCounts:
    """``token_mask`` [B, Hkv, L] (positions past a sequence's end are not counted)."""
    batch, num_kv_heads, length = token_mask.shape
    n_pages = -(-length // page_size)
    valid = torch.arange(length) < torch.tensor(list(seq_lens))[:, None]  # [B, L]
    read = torch.zeros(batch, num_kv_heads, n_pages * page_size, dtype=torch.bool)
    read[:, :, :length] = token_mask & valid[:, None]
    return ReadCounts(
        pages_in_context=sum(-(-n // page_size) for n in seq_lens) * num_kv_heads,
        pages_read=int(read.view(batch, num_kv_heads, n_pages, page_size).any(-1).sum()),
        tokens_in_context=sum(seq_lens) * num_kv_heads,
        tokens_read=int(read.sum()),
    )


def select_batch(selector: KVSelector, gate: DenseGate, *, layer: int, query: torch.Tensor,
                 sequences: Sequence[SequenceKV], page_size: int, num_kv_heads: int,
                 scale: float, per_request: bool = False) -> torch.Tensor:
    """[B, Hkv, max seq_len] bool for a decode batch (query [B, Hq, D], one token per sequence): every
    position of a sequence the gate keeps dense (``per_request``: whose request brought nothing to choose
    from), the selector's choice for the others."""
    length = max(seq.seq_len for seq in sequences)
    mask = torch.zeros(len(sequences), num_kv_heads, length, dtype=torch.bool)
    for b, seq in enumerate(sequences):
        dense = seq.request is None if per_request else gate.sequence_is_dense(seq.seq_len)
        if dense:
            mask[b, :, : seq.seq_len] = True
            continue
        chosen = selector.select(layer, query[b : b + 1], seq, scale=scale)
        if selector.granularity == "page":
            chosen = chosen.repeat_interleave(page_size, dim=1)
        mask[b, :, : seq.seq_len] = chosen[:, : seq.seq_len]
    return mask
