"""Local Linear Attention for decode rows over the paged KV cache in ONE streaming pass: a split-K Triton
kernel accumulates every sum the output needs, then a batched D x D Cholesky solve finishes in torch.

Arguments and layout as ``local_linear.py`` (``local_linear_paged_triton``). Math (``reference.py``'s
symbols; u_j = k_j - q, w_j = exp(s q.k_j - m)): besides omega = sum w, mu = sum w u and
Sigma = sum w u u^T (+ lambda omega I), the output needs only two more sums,
    o = sum_j w_j [1 - rho.u_j] v_j / delta = (sum w v - (sum w v u^T) rho) / delta,
so one pass over K and V (the cost of one softmax pass) gives everything, with no key read again for the
conjugate gradient or the weighted pass. One program per (query token, query head, split of the keys)
keeps two D x D accumulators (Sigma and sum w v u^T; 2 x 16 KiB at D = 64) and online-softmax rescaling;
splits are merged in torch (rescaled by their maxima, as flash-decoding merges), then rho = Sigma^-1 mu by
``direct.ridge_solve`` (no host sync, so the whole call can be captured in a CUDA graph).

Where it fits: decode and other rows with few queries, where forming Sigma per query is cheap and the
CG kernel (one program per token and kv head, 7-34 serial passes) leaves a GPU idle. Prefill keeps the CG
kernel. fp32 accumulation and fp32 ("ieee") dots: tf32 dots were tried on an H200 and were off the float64
reference by up to 0.68 (Sigma's rounding, amplified by the solve), so they are not offered. head_dim
must be a power of two >= 16. Tested under the Triton interpreter against the float64 reference
(tests/unit/attention_backends/local_linear/test_lla_triton.py) and on an H200 (tests/gpu).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from afterburner.attention_backends.local_linear.direct import ridge_solve
from afterburner.attention_backends.local_linear.params import DELTA_EPS, lambda_per_head
from afterburner.attention_backends.triton.local_linear import _check, _key_rows, _load_tile, token_positions

LOG2E = math.log2(math.e)


@triton.jit
def _direct_partials_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, token_seq_ptr, token_pos_ptr,
    m_ptr, omega_ptr, mu_ptr, wv_ptr, sigma_ptr, wvu_ptr,
    scale_log2, keys_per_split,
    stride_qt, stride_qh, stride_cn, stride_ct, stride_ch, stride_tb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tl.static_assert(TILE_N >= 16 and HEAD_DIM >= 16)  # tl.dot's smallest tile
    token = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1)
    num_splits = tl.num_programs(2)
    kv = head // GROUP
    b = tl.load(token_seq_ptr + token)
    n_keys = tl.load(token_pos_ptr + token) + 1  # causal: keys 0..position
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, n_keys)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + token * stride_qt + head * stride_qh + d).to(tl.float32)

    m = tl.max(tl.full([TILE_N], -float("inf"), tl.float32), axis=0)  # a scalar tensor, loop-carried
    omega = tl.sum(tl.zeros([TILE_N], tl.float32), axis=0)
    mu = tl.zeros([HEAD_DIM], tl.float32)
    wv = tl.zeros([HEAD_DIM], tl.float32)
    sigma = tl.zeros([HEAD_DIM, HEAD_DIM], tl.float32)
    wvu = tl.zeros([HEAD_DIM, HEAD_DIM], tl.float32)
    for first in range(start, end, TILE_N):  # an empty split (start >= n_keys) runs no tile: omega = 0
        rows, live = _key_rows(table_ptr, b, kv, first, end, stride_tb, stride_cn, stride_ct, stride_ch,
                               BLOCK_SIZE, TILE_N)
        k = _load_tile(k_ptr, rows, live, HEAD_DIM)
        v = _load_tile(v_ptr, rows, live, HEAD_DIM)
        s = tl.where(live, tl.sum(k * q[None, :], axis=1) * scale_log2, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))  # the tile's first key is live: finite
        rescale = tl.exp2(m - m_new)
        w = tl.exp2(s - m_new)  # 0 where no key
        u = k - q[None, :]
        wu = w[:, None] * u
        wvt = w[:, None] * v
        omega = omega * rescale + tl.sum(w, axis=0)
        mu = mu * rescale + tl.sum(wu, axis=0)
        wv = wv * rescale + tl.sum(wvt, axis=0)
        sigma = sigma * rescale + tl.dot(tl.trans(wu), u, input_precision=DOT_PRECISION)
        wvu = wvu * rescale + tl.dot(tl.trans(wvt), u, input_precision=DOT_PRECISION)
        m = m_new

    slot = (token * num_heads + head) * num_splits + split
    tl.store(m_ptr + slot, m)
    tl.store(omega_ptr + slot, omega)
    tl.store(mu_ptr + slot * HEAD_DIM + d, mu)
    tl.store(wv_ptr + slot * HEAD_DIM + d, wv)
    square = d[:, None] * HEAD_DIM + d[None, :]
    tl.store(sigma_ptr + slot * HEAD_DIM * HEAD_DIM + square, sigma)
    tl.store(wvu_ptr + slot * HEAD_DIM * HEAD_DIM + square, wvu)


def pick_splits(num_rows: int, max_keys: int, tile_n: int, device: torch.device) -> int:
    """Key splits per (token, head): enough programs for about four per multiprocessor, none empty at the
    longest possible sequence (``max_keys``: the block table's capacity, so no host sync)."""
    if device.type != "cuda":
        return max(1, min(4, triton.cdiv(max_keys, tile_n)))
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(programs, max(num_rows, 1)), triton.cdiv(max_keys, tile_n)))


def local_linear_direct_triton(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_table: torch.Tensor, seq_lens: torch.Tensor, query_start: torch.Tensor, *,
                               scale: float, lam: float | torch.Tensor, delta_eps: float = DELTA_EPS,
                               tile_n: int = 32, num_splits: int | None = None) -> torch.Tensor:
    """o [T, Hq, D] in the query's dtype (shapes: ``local_linear.py``); lambda > 0. ``num_splits`` key
    splits per (token, head) (None: ``pick_splits``). No host syncs."""
    _check(query, k_cache, v_cache, block_table, seq_lens, query_start)
    num_q, num_heads, head_dim = query.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(query)
    if num_q == 0:
        return out
    max_keys = block_table.shape[1] * block_size
    splits = num_splits or pick_splits(num_q * num_heads, max_keys, tile_n, query.device)
    keys_per_split = triton.cdiv(triton.cdiv(max_keys, splits), tile_n) * tile_n
    token_seq, token_pos = token_positions(seq_lens, query_start, num_q)
    f32 = dict(dtype=torch.float32, device=query.device)
    m = torch.empty(num_q, num_heads, splits, **f32)
    omega = torch.empty(num_q, num_heads, splits, **f32)
    mu = torch.empty(num_q, num_heads, splits, head_dim, **f32)
    wv = torch.empty(num_q, num_heads, splits, head_dim, **f32)
    sigma = torch.empty(num_q, num_heads, splits, head_dim, head_dim, **f32)
    wvu = torch.empty(num_q, num_heads, splits, head_dim, head_dim, **f32)
    _direct_partials_kernel[(num_q, num_heads, splits)](
        query, k_cache, v_cache, block_table, token_seq, token_pos, m, omega, mu, wv, sigma, wvu,
        scale * LOG2E, keys_per_split,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_table.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, TILE_N=tile_n,
        DOT_PRECISION="ieee", num_warps=4 if head_dim <= 64 else 8,
    )
    # Merge the splits (flash-decoding's rescaling; an empty split has m = -inf and weight 0).
    weight = torch.exp2(m - m.amax(-1, keepdim=True))  # [T, Hq, S]
    omega = (weight * omega).sum(-1)
    mu = (weight[..., None] * mu).sum(2)
    wv = (weight[..., None] * wv).sum(2)
    sigma = (weight[..., None, None] * sigma).sum(2)
    wvu = (weight[..., None, None] * wvu).sum(2)
    lam = lambda_per_head(lam, num_heads, dtype=torch.float32, device=query.device)
    rho, delta = ridge_solve(sigma, mu, omega, lam, delta_eps)  # [T, Hq, D], [T, Hq]
    out.copy_((wv - (wvu @ rho[..., None])[..., 0]) / delta[..., None])
    return out
