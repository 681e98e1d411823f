"""Local Linear Attention over the paged KV cache: prefill chunks and decode tokens in one call, through
the blockwise torch path. The layout is ``selective.py``'s (the engine adapters view their caches so):

    query        [T, Hq, D]          the step's query tokens, sequences back to back
    k_cache      [NB, BS, Hkv, D]    physical blocks of BS token slots; v_cache the same
    block_table  [B, MB] int         physical block of each logical block of each sequence
    seq_lens     [B] int             tokens in each sequence, this step's included
    query_start  [B + 1] int         sequence b's queries are query[query_start[b]:query_start[b + 1]], its
                                     last positions (decode: 1 token; prefill or a chunk of it: several)

Each sequence's keys are gathered once and every one of its queries and heads is solved at once; the loop
is over sequences (reading seq_lens and query_start on the host, as ``selective_attention`` does). A
sequence with at most ``direct_max_queries`` queries this step (decode, verification, a short chunk) is
solved directly (``direct.py``: exact, 3.7-5.7x the CG path per decode token on CPU); longer ones by the
blockwise CG path, which never forms the D x D matrices of every query. The Triton kernel
(``attention_backends/triton/local_linear.py``) takes the same arguments (CG only).
"""

from __future__ import annotations

import torch

from afterburner.attention_backends.local_linear.blockwise import local_linear_blockwise
from afterburner.attention_backends.local_linear.direct import local_linear_direct
from afterburner.attention_backends.local_linear.params import CG_ATOL, CG_MAX_ITERS, CG_RTOL, DELTA_EPS
from afterburner.attention_backends.selective import gather_sequence


def local_linear_paged(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_table: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor, *,
                       scale: float, lam: float | torch.Tensor, delta_eps: float = DELTA_EPS,
                       block_size: int = 64, cg_max_iters: int = CG_MAX_ITERS, cg_atol: float = CG_ATOL,
                       cg_rtol: float = CG_RTOL, jacobi: bool = False, direct_max_queries: int = 16) -> torch.Tensor:
    """o [T, Hq, D] in the query's dtype; a sequence with no query this step is skipped. ``block_size`` is
    the key block of the streaming passes (not the cache's BS); the rest as ``local_linear_blockwise``."""
    out = torch.zeros_like(query)
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = int(query_start[b]), int(query_start[b + 1])
        if end == start:
            continue
        keys = gather_sequence(k_cache, block_table[b], seq_len)
        values = gather_sequence(v_cache, block_table[b], seq_len)
        if end - start <= direct_max_queries:
            out[start:end] = local_linear_direct(query[start:end], keys, values, scale=scale, lam=lam,
                                                 delta_eps=delta_eps)
            continue
        out[start:end] = local_linear_blockwise(
            query[start:end], keys, values, scale=scale, lam=lam, delta_eps=delta_eps, block_size=block_size,
            cg_max_iters=cg_max_iters, cg_atol=cg_atol, cg_rtol=cg_rtol, jacobi=jacobi)
    return out
