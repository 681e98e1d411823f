"""Squeezed attention, stated in the fewest lines: exact attention over the selected fixed-context keys
plus every key after the fixed context (the request's suffix and generated tokens), causal.

The engine adapters run the same thing through the paged op (``selective.selective_attention`` with
``token_mask = lookup.extend_to_sequence(select_tokens(...), seq_len)``); tests compare the two.
"""

from __future__ import annotations

import torch

from .lookup import extend_to_sequence


def squeezed_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    token_mask: torch.Tensor,
    *,
    scale: float,
) -> torch.Tensor:
    """query [n_q, Hq, D] at the last n_q positions of a sequence whose keys / values are [L, Hkv, D];
    the first N = token_mask.shape[1] positions are the fixed context, of which kv head h reads the keys
    where token_mask [Hkv, N] is True. Returns [n_q, Hq, D]."""
    seq_len, n_q = keys.shape[0], query.shape[0]
    group = query.shape[1] // keys.shape[1]
    read = extend_to_sequence(token_mask, seq_len).repeat_interleave(group, 0)  # [Hq, L]
    positions = torch.arange(seq_len, device=keys.device)
    causal = positions[None, :] <= positions[seq_len - n_q:, None]  # [n_q, L]
    k = keys.float().transpose(0, 1).repeat_interleave(group, 0)  # [Hq, L, D]
    v = values.float().transpose(0, 1).repeat_interleave(group, 0)
    scores = torch.matmul(query.float().transpose(0, 1), k.transpose(1, 2)) * scale  # [Hq, n_q, L]
    probs = torch.softmax(scores.masked_fill(~(read[:, None] & causal), -torch.inf), -1).nan_to_num(0.0)
    return torch.matmul(probs, v).transpose(0, 1).to(query.dtype)
