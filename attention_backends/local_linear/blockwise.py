"""Local Linear Attention without forming Sigma (FlashLLA's algorithm, in batched torch): three kinds of
streaming pass over the keys in blocks of ``block_size``, every query and head at once.

1. ``softmax_statistics``: online softmax (running max m, rescaled sums) -> omega, sum_j w_j k_j and, for
   the Jacobi preconditioner, sum_j w_j k_j^2.
2. ``conjugate_gradient`` on Sigma rho = mu, Sigma applied matrix-free by ``sigma_times``: one more pass
   per iteration, sum_j w_j k_j (k_j.x), centred at q algebraically (below).
3. ``apply_weights``: o = sum_j w_j [1 - rho.(k_j - q)] v_j / delta.

Spec: ``reference.local_linear_reference`` (same arguments, same shapes). Layout inside: query rows
[Hkv, G, T] (kv head, query head within its group, query) so that each kv head's keys serve its G heads.
Computes in float32 (float64 for float64 inputs). Memory: one [Hq, T, block_size] block of scores at a
time. Caveat: the centring sum_j w_j (k_j - q)((k_j - q).x) is expanded into uncentred sums (matmuls,
as FlashLLA does), which loses digits in float32 when |q| is large against the spread of the keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from afterburner.attention_backends.local_linear.params import (
    CG_ATOL,
    CG_MAX_ITERS,
    CG_RTOL,
    DELTA_EPS,
    away_from_zero,
    lambda_per_head,
)


@dataclass(frozen=True)
class SoftmaxStats:
    """Pass 1's result per query row; weights are w_j = exp(scale q.k_j - m)."""
    m: torch.Tensor  # [Hkv, G, T, 1] max over the row's keys of scale q.k_j
    omega: torch.Tensor  # [Hkv, G, T, 1] sum_j w_j
    key_sum: torch.Tensor  # [Hkv, G, T, D] sum_j w_j k_j
    key_sq_sum: torch.Tensor | None  # [Hkv, G, T, D] sum_j w_j k_j^2 (Jacobi only)


def _scores(q: torch.Tensor, keys: torch.Tensor, start: int, end: int, scale: float) -> torch.Tensor:
    """scale q.k for keys [start, end), -inf past each query's own position: [Hkv, G, T, end - start].
    q [Hkv, G, T, D], keys [Hkv, L, D]; the T queries are the last T of the L positions."""
    num_q, num_k = q.shape[2], keys.shape[1]
    s = scale * q @ keys[:, None, start:end].mT
    future = torch.arange(start, end, device=q.device)[None, :] > torch.arange(num_k - num_q, num_k,
                                                                                device=q.device)[:, None]
    return s.masked_fill(future, -torch.inf)


def _weighted_blocks(q, keys, m, scale, block_size) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, end, w [Hkv, G, T, n]) for each key block, w = exp(scale q.k - m) (0 in the future)."""
    for start in range(0, keys.shape[1], block_size):
        end = min(start + block_size, keys.shape[1])
        yield start, end, torch.exp(_scores(q, keys, start, end, scale) - m)


def softmax_statistics(q, keys, *, scale: float, block_size: int, jacobi: bool) -> SoftmaxStats:
    """One streaming pass, the running max rescaling the sums as in FlashAttention. Every query reads key
    0, so m is finite from the first block on (no -inf - -inf to guard)."""
    rows = q.shape[:3]
    m = torch.full((*rows, 1), -torch.inf, dtype=q.dtype, device=q.device)
    omega = torch.zeros_like(m)
    key_sum = torch.zeros_like(q)
    key_sq_sum = torch.zeros_like(q) if jacobi else None
    for start in range(0, keys.shape[1], block_size):
        end = min(start + block_size, keys.shape[1])
        s = _scores(q, keys, start, end, scale)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        rescale, w = torch.exp(m - m_new), torch.exp(s - m_new)
        block = keys[:, None, start:end]  # [Hkv, 1, n, D]
        omega = rescale * omega + w.sum(-1, keepdim=True)
        key_sum = rescale * key_sum + w @ block
        if jacobi:
            key_sq_sum = rescale * key_sq_sum + w @ block.square()
        m = m_new
    return SoftmaxStats(m, omega, key_sum, key_sq_sum)


def sigma_times(x, q, keys, stats: SoftmaxStats, lam, *, scale: float, block_size: int) -> torch.Tensor:
    """Sigma x per row without Sigma: sum_j w_j (k_j - q)((k_j - q).x) + lambda omega x, expanded as
    sum_j w_j k_j (k_j.x) - (q.x) key_sum - (key_sum.x) q + omega (q.x) q + lambda omega x, so the
    streamed part is two matmuls per block. x, q [Hkv, G, T, D]; lam [Hkv, G, 1, 1]."""
    acc = torch.zeros_like(x)
    for start, end, w in _weighted_blocks(q, keys, stats.m, scale, block_size):
        block = keys[:, None, start:end]
        acc = acc + (w * (x @ block.mT)) @ block
    xq = (x * q).sum(-1, keepdim=True)
    xk = (x * stats.key_sum).sum(-1, keepdim=True)
    return acc - xq * stats.key_sum - xk * q + stats.omega * xq * q + lam * stats.omega * x


def centred_mean(q, stats: SoftmaxStats) -> torch.Tensor:
    """mu = sum_j w_j (k_j - q): [Hkv, G, T, D]."""
    return stats.key_sum - stats.omega * q


def sigma_diagonal(q, stats: SoftmaxStats, lam) -> torch.Tensor:
    """diag(Sigma) = sum_j w_j (k_j - q)^2 + lambda omega, from pass 1's sums: the Jacobi preconditioner."""
    return stats.key_sq_sum - 2 * q * stats.key_sum + stats.omega * q.square() + lam * stats.omega


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *,
                       diagonal: torch.Tensor | None = None, max_iters: int = CG_MAX_ITERS,
                       atol: float = CG_ATOL, rtol: float = CG_RTOL) -> torch.Tensor:
    """Solve A x = b for every row of b [..., D] at once (A symmetric positive definite, applied by
    ``matvec``), from x = 0, Jacobi-preconditioned when ``diagonal`` (A's diagonal) is given.

    A row stops when its squared preconditioned residual r.z <= rtol * max(atol, r0.z0) (FlashLLA's rule:
    squared, so the 1e-12 defaults ask for about 1e-6 in the residual norm), when b is 0, or when it turns
    non-finite; stopped rows keep their x. In exact arithmetic CG is exact after D iterations."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = r / diagonal if diagonal is not None else r
    p = z
    rz = (r * z).sum(-1, keepdim=True)
    threshold = rtol * torch.clamp(rz, min=atol)
    active = rz != 0
    for _ in range(max_iters):
        # One host sync per iteration: on CPU it is free and skips the remaining passes over the keys.
        if not bool(active.any()):
            break
        ap = matvec(p)
        p_ap = (p * ap).sum(-1, keepdim=True)
        # FlashLLA divides by p_ap + 1e-10; a fixed floor biases rows whose scale is small, so stopped
        # or degenerate rows take a zero step instead.
        alpha = torch.where(active & (p_ap > 0), rz / p_ap.where(p_ap > 0, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        z = r / diagonal if diagonal is not None else r
        rz_new = (r * z).sum(-1, keepdim=True)
        active = active & (rz_new > threshold) & torch.isfinite(rz_new)
        beta = torch.where(active, rz_new / rz.where(rz != 0, 1.0), 0.0)
        p = z + beta * p
        rz = rz_new
    return x


def apply_weights(q, keys, values, stats: SoftmaxStats, rho, *, scale: float, block_size: int,
                  delta_eps: float) -> torch.Tensor:
    """The last pass: sum_j w_j [1 - rho.(k_j - q)] v_j / delta; values [Hkv, L, D] -> [Hkv, G, T, D]."""
    delta = stats.omega - (centred_mean(q, stats) * rho).sum(-1, keepdim=True)
    delta = away_from_zero(delta, delta_eps)
    rho_q = (rho * q).sum(-1, keepdim=True)
    out = torch.zeros_like(q)
    for start, end, w in _weighted_blocks(q, keys, stats.m, scale, block_size):
        coef = w * (1 - rho @ keys[:, None, start:end].mT + rho_q)
        out = out + coef @ values[:, None, start:end]
    return out / delta


def local_linear_blockwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                           lam: float | torch.Tensor, delta_eps: float = DELTA_EPS, block_size: int = 64,
                           cg_max_iters: int = CG_MAX_ITERS, cg_atol: float = CG_ATOL, cg_rtol: float = CG_RTOL,
                           jacobi: bool = False) -> torch.Tensor:
    """q [T, Hq, D], k, v [L, Hkv, D] (queries = the last T positions) -> o [T, Hq, D] in q's dtype."""
    rows, keys, values, lam_rows = _grouped(q, k, v, lam)
    stats = softmax_statistics(rows, keys, scale=scale, block_size=block_size, jacobi=jacobi)
    rho = conjugate_gradient(
        lambda x: sigma_times(x, rows, keys, stats, lam_rows, scale=scale, block_size=block_size),
        centred_mean(rows, stats), diagonal=sigma_diagonal(rows, stats, lam_rows) if jacobi else None,
        max_iters=cg_max_iters, atol=cg_atol, rtol=cg_rtol)
    out = apply_weights(rows, keys, values, stats, rho, scale=scale, block_size=block_size, delta_eps=delta_eps)
    return out.flatten(0, 1).transpose(0, 1).to(q.dtype)  # [Hq, T, D] -> [T, Hq, D]


def _grouped(q, k, v, lam):
    """Compute-dtype views: q rows [Hkv, G, T, D], keys / values [Hkv, L, D], lambda [Hkv, G, 1, 1]."""
    num_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_heads % num_kv_heads or k.shape != v.shape or k.shape[2] != head_dim or k.shape[0] < num_q:
        raise ValueError(f"q [T, Hq, D] {tuple(q.shape)}, k and v [L >= T, Hkv | Hq, D] {tuple(k.shape)}, "
                         f"{tuple(v.shape)} do not fit")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = q.to(dtype).view(num_q, num_kv_heads, num_heads // num_kv_heads, head_dim).permute(1, 2, 0, 3)
    lam = lambda_per_head(lam, num_heads, dtype=dtype, device=q.device).view(num_kv_heads, -1, 1, 1)
    return rows, k.to(dtype).transpose(0, 1), v.to(dtype).transpose(0, 1), lam
