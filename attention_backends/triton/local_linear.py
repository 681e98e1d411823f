"""Local Linear Attention forward over the paged KV cache, FlashLLA's three passes fused in one kernel.

    query        [T, Hq, D]          the step's query tokens, sequences back to back
    k_cache      [NB, BS, Hkv, D]    physical blocks; v_cache the same shape and strides
    block_table  [B, MB] int32       logical -> physical block
    seq_lens     [B] int             tokens in each sequence (this step's included)
    query_start  [B + 1] int         sequence b's queries are its last query_start[b+1] - query_start[b] tokens
    out          [T, Hq, D]          in the query's dtype

Spec: ``local_linear/reference.py`` (the math) through ``local_linear/paged.py`` (same arguments). Algorithm
(Zuo et al. 2025, arXiv 2510.01450; FlashLLA's forward): one program per (query token, kv head) holds the
group's query heads as rows (padded to 16 for tl.dot) and streams that token's keys through the block table
in tiles of TILE_N: (1) online softmax -> omega, sum w k (and sum w k^2 for Jacobi); (2) conjugate gradient
on Sigma rho = mu, each iteration one more stream computing sum w k (k.p), centred algebraically; (3) o =
sum w [1 - rho.(k - q)] v / delta. Rows stop as in ``blockwise.conjugate_gradient``; when every row of a
program has stopped, the remaining iterations stream no keys.

Caveats: decode-shaped: each query token is its own program, so prefill re-reads K per token (fine for
decode and short chunks; a row tile of queries is the step for long prefill). Everything runs in fp32
(loads are upcast; dots use ieee precision): CG in bf16, as FlashLLA runs it, needs a large lambda.
head_dim must be a power of two >= 16. Tested under the Triton interpreter
(tests/unit/attention_backends/local_linear/test_lla_triton.py); not yet timed on a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from afterburner.attention_backends.local_linear.params import (
    CG_ATOL,
    CG_MAX_ITERS,
    CG_RTOL,
    DELTA_EPS,
    lambda_per_head,
)

LOG2E = math.log2(math.e)


@triton.jit
def _key_rows(table_ptr, b, kv, first, n_keys, stride_tb, stride_cn, stride_ct, stride_ch,
              BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr):
    """Offsets of key positions [first, first + TILE_N) of sequence b, kv head kv, and which exist."""
    t = first + tl.arange(0, TILE_N)
    live = t < n_keys
    physical = tl.load(table_ptr + b * stride_tb + t // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
    return physical * stride_cn + (t % BLOCK_SIZE) * stride_ct + kv * stride_ch, live


@triton.jit
def _load_tile(ptr, rows, live, HEAD_DIM: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)
    return tl.load(ptr + rows[:, None] + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)


@triton.jit
def _weights(q, k, live, m, scale_log2, DOT_PRECISION: tl.constexpr):
    """w = 2^(scale log2(e) q.k - m) = exp(scale q.k - m ln 2): [ROWS, TILE_N], 0 where no key."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
    return tl.exp2(tl.where(live[None, :], s, -float("inf")) - m[:, None])


@triton.jit
def _local_linear_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, token_seq_ptr, token_pos_ptr, lam_ptr, o_ptr,
    scale_log2, delta_eps, cg_atol, cg_rtol, cg_max_iters,
    stride_qt, stride_qh, stride_cn, stride_ct, stride_ch, stride_tb, stride_ot, stride_oh,
    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr, JACOBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(ROWS >= 16 and ROWS >= GROUP)  # tl.dot needs 16 rows
    tl.static_assert(TILE_N >= 16 and HEAD_DIM >= 16)
    token = tl.program_id(0)
    kv = tl.program_id(1)
    b = tl.load(token_seq_ptr + token)
    n_keys = tl.load(token_pos_ptr + token) + 1  # causal: keys 0..position
    g = tl.arange(0, ROWS)
    d = tl.arange(0, HEAD_DIM)
    heads = kv * GROUP + g
    q = tl.load(q_ptr + token * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0).to(tl.float32)  # padding rows: q = 0, never stored
    lam = tl.load(lam_ptr + heads, mask=g < GROUP, other=1.0)

    # Pass 1: online softmax statistics (key 0 is in the first tile, so m is finite after it).
    m = tl.full([ROWS], -float("inf"), tl.float32)
    omega = tl.zeros([ROWS], tl.float32)
    key_sum = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    key_sq_sum = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for first in range(0, n_keys, TILE_N):
        rows, live = _key_rows(table_ptr, b, kv, first, n_keys, stride_tb, stride_cn, stride_ct, stride_ch,
                               BLOCK_SIZE, TILE_N)
        k = _load_tile(k_ptr, rows, live, HEAD_DIM)
        s = tl.where(live[None, :], tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2,
                     -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        rescale = tl.exp2(m - m_new)
        w = tl.exp2(s - m_new[:, None])
        omega = omega * rescale + tl.sum(w, axis=1)
        key_sum = key_sum * rescale[:, None] + tl.dot(w, k, input_precision=DOT_PRECISION)
        if JACOBI:
            key_sq_sum = key_sq_sum * rescale[:, None] + tl.dot(w, k * k, input_precision=DOT_PRECISION)
        m = m_new

    # Pass 2: CG on Sigma rho = mu, Sigma p = sum w k (k.p) - (q.p) key_sum - (key_sum.p) q
    # + omega (q.p) q + lambda omega p (blockwise.sigma_times).
    mu = key_sum - omega[:, None] * q
    ridge = lam * omega
    diagonal = key_sq_sum - 2.0 * q * key_sum + omega[:, None] * q * q + ridge[:, None]
    x = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    r = mu
    z = r
    if JACOBI:
        z = r / diagonal
    p = z
    rz = tl.sum(r * z, axis=1)
    threshold = cg_rtol * tl.maximum(rz, cg_atol)
    active = (rz != 0.0) & (g < GROUP)
    for _ in range(cg_max_iters):
        any_active = tl.max(active.to(tl.int32), axis=0) > 0
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        for first in range(0, tl.where(any_active, n_keys, 0), TILE_N):  # all stopped: stream nothing
            rows, live = _key_rows(table_ptr, b, kv, first, n_keys, stride_tb, stride_cn, stride_ct, stride_ch,
                                   BLOCK_SIZE, TILE_N)
            k = _load_tile(k_ptr, rows, live, HEAD_DIM)
            w = _weights(q, k, live, m, scale_log2, DOT_PRECISION)
            proj = tl.dot(p, tl.trans(k), input_precision=DOT_PRECISION)
            acc += tl.dot(w * proj, k, input_precision=DOT_PRECISION)
        pq = tl.sum(p * q, axis=1)
        pk = tl.sum(p * key_sum, axis=1)
        ap = acc - pq[:, None] * key_sum - pk[:, None] * q + (omega * pq)[:, None] * q + ridge[:, None] * p
        p_ap = tl.sum(p * ap, axis=1)
        alpha = tl.where(active & (p_ap > 0), rz / tl.where(p_ap > 0, p_ap, 1.0), 0.0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        z = r
        if JACOBI:
            z = r / diagonal
        rz_new = tl.sum(r * z, axis=1)
        active = active & (rz_new > threshold) & (tl.abs(rz_new) < float("inf"))  # NaN compares False
        beta = tl.where(active, rz_new / tl.where(rz != 0.0, rz, 1.0), 0.0)
        p = z + beta[:, None] * p
        rz = rz_new

    # Pass 3: corrected weights; delta keeps its sign and is moved delta_eps away from 0 (params.py).
    delta = omega - tl.sum(mu * x, axis=1)
    delta = delta + delta_eps * tl.where(delta >= 0, 1.0, -1.0)
    xq = tl.sum(x * q, axis=1)
    out = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for first in range(0, n_keys, TILE_N):
        rows, live = _key_rows(table_ptr, b, kv, first, n_keys, stride_tb, stride_cn, stride_ct, stride_ch,
                               BLOCK_SIZE, TILE_N)
        k = _load_tile(k_ptr, rows, live, HEAD_DIM)
        w = _weights(q, k, live, m, scale_log2, DOT_PRECISION)
        coef = w * (1.0 - tl.dot(x, tl.trans(k), input_precision=DOT_PRECISION) + xq[:, None])
        out += tl.dot(coef, _load_tile(v_ptr, rows, live, HEAD_DIM), input_precision=DOT_PRECISION)
    out = out / delta[:, None]
    tl.store(o_ptr + token * stride_ot + heads[:, None] * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(g < GROUP)[:, None])


def _check(query, k_cache, v_cache, block_table, seq_lens, query_start) -> None:
    num_q, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match "
                         f"(shape and strides), with head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim={head_dim}: the kernel needs a power of two, at least 16")
    batch = seq_lens.shape[0]
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be int32 [B={batch}, MB], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    if query_start.shape != (batch + 1,):
        raise ValueError(f"query_start must be [B + 1 = {batch + 1}], got {tuple(query_start.shape)}")
    if query.stride(-1) != 1 or k_cache.stride(-1) != 1 or block_table.stride(-1) != 1:
        raise ValueError("query, caches and block_table must be contiguous in their last dimension")
    devices = {x.device for x in (query, k_cache, v_cache, block_table, seq_lens, query_start)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def token_positions(seq_lens: torch.Tensor, query_start: torch.Tensor, num_tokens: int):
    """(sequence [T], position in it [T]) of each query token, int32, without a host sync: the queries
    of sequence b are its last ones, so token t sits at seq_lens[b] - (query_start[b + 1] - t)."""
    q_lens = query_start[1:] - query_start[:-1]
    seq = torch.repeat_interleave(torch.arange(len(seq_lens), device=seq_lens.device), q_lens,
                                  output_size=num_tokens)
    tokens = torch.arange(num_tokens, device=seq_lens.device)
    return seq.int(), (seq_lens[seq] - query_start[seq + 1] + tokens).int()


def local_linear_paged_triton(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_table: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor, *,
                              scale: float, lam: float | torch.Tensor, delta_eps: float = DELTA_EPS,
                              cg_max_iters: int = CG_MAX_ITERS, cg_atol: float = CG_ATOL,
                              cg_rtol: float = CG_RTOL, jacobi: bool = False, tile_n: int = 64) -> torch.Tensor:
    """o [T, Hq, D] in the query's dtype (shapes in the module docstring); ``tile_n`` keys per streamed
    tile (a power of two >= 16). No host syncs: shapes decide the launch."""
    _check(query, k_cache, v_cache, block_table, seq_lens, query_start)
    num_q, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    if num_q == 0:
        return out
    token_seq, token_pos = token_positions(seq_lens, query_start, num_q)
    lam = lambda_per_head(lam, num_heads, dtype=torch.float32, device=query.device).contiguous()
    _local_linear_kernel[(num_q, num_kv_heads)](
        query, k_cache, v_cache, block_table, token_seq, token_pos, lam, out,
        scale * LOG2E, delta_eps, cg_atol, cg_rtol, cg_max_iters,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1),
        GROUP=group, ROWS=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        TILE_N=tile_n, JACOBI=jacobi, DOT_PRECISION="ieee", num_warps=4, num_stages=2,
    )
    return out
