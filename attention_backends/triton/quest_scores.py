"""Quest block scores on the GPU: the decode-step upper bound per (sequence, kv head, logical block).

    score[b, kv, n] = max over query heads h of kv's group of  sum_d max(q[b,h,d] * kmin[p,kv,d],
                                                                        q[b,h,d] * kmax[p,kv,d]),
    p = block_table[b, n]; -inf for n >= ceil(seq_lens[b] / block_size)

Spec: ``sparse.quest.block_scores`` (Tang et al., ICML 2024), for one query token per sequence. One program
per (sequence, kv head, tile of BLOCK_N logical blocks): it reads BLOCK_N rows of kmin and kmax once and
folds every query head of the group into them, so summaries are read once per kv head, not per query
head. The summaries are as many bytes as 2 / block_size of the keys (times their dtype ratio: fp32
summaries over a bf16 cache read 1/4 of K's bytes at block size 16), which is what scoring costs.
Tested under the Triton interpreter against the reference (tests/unit/attention_backends/test_triton_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quest_scores_kernel(
    q_ptr, kmin_ptr, kmax_ptr, table_ptr, seq_lens_ptr, out_ptr,
    stride_qb, stride_qh,
    stride_sn, stride_sh,  # kmin and kmax share strides (the launcher checks)
    stride_tb,
    stride_ob, stride_oh,
    max_blocks,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kv = tl.program_id(1)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    n_blocks = tl.cdiv(tl.load(seq_lens_ptr + b), BLOCK_SIZE)
    live = n < n_blocks
    physical = tl.load(table_ptr + b * stride_tb + n, mask=live, other=0).to(tl.int64)
    rows = physical[:, None] * stride_sn + kv * stride_sh + d[None, :]
    lo = tl.load(kmin_ptr + rows, mask=live[:, None], other=0.0).to(tl.float32)  # [BLOCK_N, D]
    hi = tl.load(kmax_ptr + rows, mask=live[:, None], other=0.0).to(tl.float32)
    best = tl.full([BLOCK_N], -float("inf"), tl.float32)
    for g in tl.static_range(GROUP):
        q = tl.load(q_ptr + b * stride_qb + (kv * GROUP + g) * stride_qh + d).to(tl.float32)[None, :]
        best = tl.maximum(best, tl.sum(tl.maximum(q * lo, q * hi), axis=1))
    best = tl.where(live, best, -float("inf"))
    tl.store(out_ptr + b * stride_ob + kv * stride_oh + n, best, mask=n < max_blocks)


def quest_block_scores(query: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, block_table: torch.Tensor,
                       seq_lens: torch.Tensor, *, block_size: int) -> torch.Tensor:
    """query [B, Hq, D] (one decode token per sequence), kmin / kmax [NB, Hkv, D], block_table [B, MB],
    seq_lens [B] -> scores [B, Hkv, MB] float32, -inf past each sequence's last block."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = kmin.shape[1]
    max_blocks = block_table.shape[1]
    if kmin.shape != kmax.shape or kmin.stride() != kmax.stride() or kmin.shape[2] != head_dim:
        raise ValueError(f"kmin {tuple(kmin.shape)} / kmax {tuple(kmax.shape)} must match, with D={head_dim}")
    if num_heads % num_kv_heads or head_dim & (head_dim - 1):
        raise ValueError(f"need Hq % Hkv == 0 and a power-of-two head_dim, got {num_heads}, {num_kv_heads}, "
                         f"{head_dim}")
    if query.stride(2) != 1 or kmin.stride(2) != 1 or block_table.stride(1) != 1:
        raise ValueError("query, kmin/kmax and block_table must be contiguous in their last dimension")
    if seq_lens.shape != (batch,) or block_table.shape[0] != batch:
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} and block_table {tuple(block_table.shape)} "
                         f"vs B={batch}")
    out = torch.empty(batch, num_kv_heads, max_blocks, dtype=torch.float32, device=query.device)
    # 64 rows x D of two fp32 tiles stays well inside registers at D=128 with 4 warps.
    block_n = min(64, triton.next_power_of_2(max_blocks))
    grid = (batch, num_kv_heads, triton.cdiv(max_blocks, block_n))
    _quest_scores_kernel[grid](
        query, kmin, kmax, block_table, seq_lens, out,
        query.stride(0), query.stride(1), kmin.stride(0), kmin.stride(1), block_table.stride(0),
        out.stride(0), out.stride(1), max_blocks,
        BLOCK_SIZE=block_size, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_N=block_n,
        num_warps=4,
    )
    return out
