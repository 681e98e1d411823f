"""Sparse paged decode attention: each (sequence, kv head) reads only its selected KV blocks.

    query      [B, Hq, D]            one decode token per sequence, at position seq_lens[b] - 1
    k_cache    [NB, BS, Hkv, D]      physical blocks; v_cache the same shape and strides
    block_table[B, MB] int32         logical -> physical block
    seq_lens   [B] int32             tokens in each sequence (this step's included)
    block_ids  [B, Hkv, W] int32     selected logical blocks, -1 = padding (selection.py)
    out        [B, Hq, D]            softmax(scale * q.k) v over the selected keys, 0 if none

Spec: ``selective.selective_attention_reference`` restricted to decode. Algorithm: flash-decoding
(Dao et al. 2023, "Flash-Decoding for long-context inference"): the selected blocks of one row are cut
into ``num_splits`` equal shares, one program per (sequence, kv head, share), each running an online
softmax in fp32 over tiles of TILE_N tokens gathered through the block table; a second kernel merges the
shares by their log-sum-exp. Splitting matters at decode: B * Hkv programs (8 at batch 1 on a Llama-8B
layer) would leave most of an H100's 132 SMs idle however long the context. With one share the first
kernel writes the output directly and the merge is skipped.

All query heads of a kv head's group share one program (GQA): K and V are read once per kv head; the
group is padded to 16 rows for tl.dot, which costs tensor-core FLOPs that decode has to spare.
Tested under the Triton interpreter against the reference (tests/unit/attention_backends/test_triton_kernels.py) and on
CUDA in tests/gpu/test_triton_kernels_gpu.py. Caveats: decode only (one query token per sequence);
head_dim and block size must be powers of two; padding entries still cost a loop step, so keep W near the
budget.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)


@triton.jit
def _sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, seq_lens_ptr, ids_ptr, o_ptr, lse_ptr,
    scale_log2,  # softmax scale * log2(e): scores live in base 2 so exp2 does the work
    stride_qb, stride_qh,
    stride_kn, stride_kt, stride_kh,  # shared by k_cache and v_cache (the launcher checks)
    stride_tb, stride_ib, stride_ih,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    num_ids, ids_per_split,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    TILE_BLOCKS: tl.constexpr, STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(GROUP_PAD >= 16 and GROUP_PAD >= GROUP)  # tl.dot needs 16 rows
    TILE_N: tl.constexpr = TILE_BLOCKS * BLOCK_SIZE
    tl.static_assert(TILE_N >= 16)
    b = tl.program_id(0)
    kv = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)  # [GROUP_PAD, D]

    t = tl.arange(0, TILE_N)
    slot, offset = t // BLOCK_SIZE, t % BLOCK_SIZE  # token t of a tile: which selected block, where in it
    m = tl.full([GROUP_PAD], -float("inf"), tl.float32)  # running max of the base-2 scores
    l = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)

    start = split * ids_per_split
    end = tl.minimum(start + ids_per_split, num_ids)
    for first in range(start, end, TILE_BLOCKS):
        entry = first + slot
        logical = tl.load(ids_ptr + b * stride_ib + kv * stride_ih + entry, mask=entry < end, other=-1)
        live = (logical >= 0) & (logical * BLOCK_SIZE + offset < seq_len)  # padding; past the last token
        physical = tl.load(table_ptr + b * stride_tb + logical, mask=live, other=0).to(tl.int64)
        rows = physical * stride_kn + offset * stride_kt + kv * stride_kh
        k = tl.load(k_ptr + rows[:, None] + d[None, :], mask=live[:, None], other=0.0)  # [TILE_N, D]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [GROUP_PAD, TILE_N]
        s = tl.where(live[None, :], s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # nothing seen yet: avoid inf - inf
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + rows[:, None] + d[None, :], mask=live[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    seen = l > 0  # a share with no live key contributes nothing (and a row with none outputs 0)
    out = acc / tl.where(seen, l, 1.0)[:, None]
    o_rows = b * stride_ob + heads * stride_oh + split * stride_os
    tl.store(o_ptr + o_rows[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])
    if STORE_LSE:
        lse = tl.where(seen, m + tl.log2(tl.where(seen, l, 1.0)), -float("inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g < GROUP)


@triton.jit
def _merge_splits_kernel(
    part_ptr, lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    num_splits,
    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """out[b, h] = sum_s w_s part[b, h, s] / sum_s w_s with w_s = 2^(lse_s - max lse): the shares' softmax
    normalisers put back, relative to the largest so nothing overflows."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=s < num_splits, other=-float("inf"))
    top = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(top == -float("inf"), 0.0, top))  # empty shares weigh 0
    part = tl.load(part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                   mask=(s < num_splits)[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * part, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def tile_blocks(block_size: int) -> int:
    """Selected blocks gathered per loop step: 64 tokens a step (one block if blocks are larger), enough
    independent row loads in flight to hide latency without spilling the [TILE_N, D] tiles."""
    return max(1, 64 // block_size)


def pick_num_splits(batch: int, num_kv_heads: int, width: int, block_size: int, device: torch.device) -> int:
    """Shares per (sequence, kv head): enough programs for about two waves on the GPU's SMs, but at least
    two tiles per share so the merge never dominates. One share when B * Hkv alone fills the GPU, and on
    CPU (the interpreter runs programs one after another: splitting buys nothing there)."""
    if device.type != "cuda":
        return 1
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(width, tile_blocks(block_size))
    wanted = triton.cdiv(2 * sm_count, batch * num_kv_heads)
    return max(1, min(wanted, triton.cdiv(tiles, 2)))


def _check(query, k_cache, v_cache, block_table, seq_lens, block_ids) -> None:
    batch, num_heads, head_dim = query.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match "
                         f"(shape and strides), with head_dim {head_dim}")
    if not query.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"query {query.dtype} and caches {k_cache.dtype} / {v_cache.dtype} must share "
                         "a dtype")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    for name, n in (("head_dim", head_dim), ("block_size", block_size)):
        if n & (n - 1) or n < (16 if name == "head_dim" else 1):
            raise ValueError(f"{name}={n}: the kernel needs a power of two (head_dim at least 16)")
    if block_ids.dim() != 3 or block_ids.shape[:2] != (batch, num_kv_heads) or block_ids.dtype != torch.int32:
        raise ValueError(f"block_ids must be int32 [B={batch}, Hkv={num_kv_heads}, W], got "
                         f"{block_ids.dtype} {tuple(block_ids.shape)}")
    if block_table.shape[0] != batch or seq_lens.shape != (batch,) or block_table.dtype != torch.int32:
        raise ValueError(f"block_table int32 [B, MB] and seq_lens [B] with B={batch}, got "
                         f"{block_table.dtype} {tuple(block_table.shape)} and {tuple(seq_lens.shape)}")
    if any(x.stride(-1) != 1 for x in (query, k_cache, block_table, block_ids)):
        raise ValueError("query, caches, block_table and block_ids must be contiguous in their last "
                         "dimension")
    devices = {x.device for x in (query, k_cache, v_cache, block_table, seq_lens, block_ids)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def sparse_paged_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor, block_ids: torch.Tensor, *,
                        scale: float, num_splits: int | None = None) -> torch.Tensor:
    """Decode attention over the blocks in ``block_ids`` (shapes in the module docstring) -> [B, Hq, D] in
    the query's dtype. ``num_splits`` None: ``pick_num_splits``. No host syncs: shapes decide the launch."""
    _check(query, k_cache, v_cache, block_table, seq_lens, block_ids)
    batch, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    width = block_ids.shape[2]
    per_tile = tile_blocks(block_size)
    if num_splits is None:
        num_splits = pick_num_splits(batch, num_kv_heads, width, block_size, query.device)
    # Whole tiles per share, so no tile straddles two shares; then drop shares left with nothing.
    ids_per_split = triton.cdiv(triton.cdiv(width, num_splits), per_tile) * per_tile
    num_splits = max(1, triton.cdiv(width, ids_per_split))
    group = num_heads // num_kv_heads
    out = torch.empty(batch, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if num_splits == 1:
        part, lse, part_strides = out, out, (out.stride(0), out.stride(1), 0)  # lse unused: STORE_LSE off
    else:
        part = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=query.device)
        part_strides = part.stride()[:3]
    _sparse_decode_kernel[(batch, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_table, seq_lens, block_ids, part, lse,
        scale * LOG2E,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0), block_ids.stride(0), block_ids.stride(1),
        *part_strides, lse.stride(0), lse.stride(1),
        width, ids_per_split,
        BLOCK_SIZE=block_size, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, TILE_BLOCKS=per_tile, STORE_LSE=num_splits > 1,
        # fp32 caches: exact fp32 products (the default would round q and k to tf32 on the GPU).
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch, num_heads)](
            part, lse, out, *part.stride()[:3], lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
            num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, num_warps=4,
        )
    return out
