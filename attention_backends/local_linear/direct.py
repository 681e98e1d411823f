"""Local Linear Attention for a few queries per sequence (decode rows, verification), solving Sigma directly.

FlashLLA never forms Sigma_i (D x D per query and head) because prefill has a query per key; a decode step
has one query per sequence, and there Sigma is cheap (L D^2 multiply-adds per query head, matrix-shaped) and
the solve is one batched D x D factorisation instead of up to 32 conjugate-gradient passes over the keys,
each a matrix-vector product. So this path is parallel where the CG path is serial (on a GPU the Triton CG
kernel runs one program per query and kv head), and exact where CG stops early (FlashLLA's rule leaves
errors near 1e-3 at head_dim 128; more at small lambda with few keys, where Jacobi makes it worse).

Same math as ``reference.py`` (symbols there). Keys are shifted by c, the mean of each sequence's valid keys
per kv head (k' = k - c, q' = q - c; u_j = k_j - q = k'_j - q'), which keeps the sums below small:
    omega = sum w,  mu = sum w k' - omega q',  Sigma = sum w u u^T + lambda omega I   (u centred per query)
    rho = Sigma^-1 mu (Cholesky: SPD for lambda > 0; not for lambda = 0),  delta = omega - mu.rho (+ eps sign)
    o = sum_j w_j [(1 + rho.q') - rho.k'_j] v_j / delta
Shapes (batched, padded): q [B, T, Hq, D] (sequence b's last T positions), k, v [B, L, Hkv, D] with keys
past ``lengths[b]`` ignored. Compute in float32 (float64 in, float64 out). Memory: w [B, Hq, T, L] plus a
chunk of u [B, Hq, T, chunk, D] (``max_chunk_elements``).
"""

from __future__ import annotations

import torch

from afterburner.attention_backends.local_linear.params import DELTA_EPS, away_from_zero, lambda_per_head

MAX_CHUNK_ELEMENTS = 1 << 26  # 256 MiB of float32 for the chunk of centred keys u in the scatter pass


def local_linear_direct(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                        lam: float | torch.Tensor, delta_eps: float = DELTA_EPS) -> torch.Tensor:
    """One sequence: q [T, Hq, D], k, v [L, Hkv, D] (queries = the last T positions) -> o [T, Hq, D]."""
    lengths = torch.full((1,), k.shape[0], device=k.device)  # filled on the device: no host copy
    return local_linear_direct_batched(q[None], k[None], v[None], lengths, scale=scale, lam=lam,
                                       delta_eps=delta_eps)[0]


def local_linear_direct_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *,
                                scale: float, lam: float | torch.Tensor, delta_eps: float = DELTA_EPS,
                                max_chunk_elements: int = MAX_CHUNK_ELEMENTS) -> torch.Tensor:
    """q [B, T, Hq, D], k, v [B, L, Hkv, D], lengths [B] (T <= lengths[b] <= L) -> o [B, T, Hq, D] in q's
    dtype. No host syncs: shapes alone decide the work."""
    batch, num_q, num_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    if num_heads % num_kv_heads or k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"q [B, T, Hq, D] {tuple(q.shape)} and k, v [B, L, Hkv, D] {tuple(k.shape)}, "
                         f"{tuple(v.shape)} do not fit")
    group = num_heads // num_kv_heads
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys, values = k.to(dtype).transpose(1, 2), v.to(dtype).transpose(1, 2)  # [B, Hkv, L, D]
    rows = q.to(dtype).view(batch, num_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)  # [B,Hkv,G,T,D]
    positions = torch.arange(num_keys, device=k.device)
    query_pos = lengths[:, None] - num_q + torch.arange(num_q, device=k.device)  # [B, T]
    allowed = positions <= query_pos[..., None]  # [B, T, L]: causal, and so inside the sequence
    flat = rows.reshape(batch, num_kv_heads, group * num_q, head_dim)
    scores = scale * (flat @ keys.mT).view(batch, num_kv_heads, group, num_q, num_keys)
    scores = scores.masked_fill(~allowed[:, None, None], -torch.inf)
    w = torch.exp(scores - scores.amax(-1, keepdim=True))  # [B, Hkv, G, T, L]
    valid = positions < lengths[:, None]  # [B, L]
    shift = (keys * valid[:, None, :, None]).sum(2) / lengths.clamp_min(1).to(dtype)[:, None, None]  # [B,Hkv,D]
    keys = keys - shift[:, :, None]  # k'
    rows = rows - shift[:, :, None, None]  # q'
    omega = w.sum(-1)
    wf = w.view(batch, num_kv_heads, group * num_q, num_keys)
    s1 = (wf @ keys).view_as(rows)
    lam = lambda_per_head(lam, num_heads, dtype=dtype, device=q.device).view(num_kv_heads, group, 1)
    mu = s1 - omega[..., None] * rows
    sigma = _weighted_scatter(w, keys, rows, max_chunk_elements)  # [B, Hkv, G, T, D, D]
    rho, delta = ridge_solve(sigma, mu, omega, lam, delta_eps)
    along = (rho.reshape(batch, num_kv_heads, group * num_q, head_dim) @ keys.mT).view_as(w)  # rho.k'_j
    weights = w * ((1 + (rho * rows).sum(-1))[..., None] - along) / delta[..., None]
    out = weights.view(batch, num_kv_heads, group * num_q, num_keys) @ values  # [B, Hkv, G*T, D]
    return out.view(batch, num_kv_heads, group, num_q, head_dim).permute(0, 3, 1, 2, 4).reshape(q.shape).to(q.dtype)


def ridge_solve(scatter: torch.Tensor, mu: torch.Tensor, omega: torch.Tensor, lam: torch.Tensor,
                delta_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho [..., D], delta [...]) from scatter = sum w u u^T [..., D, D], mu [..., D], omega [...] and lambda
    (broadcastable to omega): rho = (scatter + lambda omega I)^-1 mu, delta = omega - mu.rho moved off 0."""
    sigma = scatter + torch.diag_embed((lam * omega)[..., None].expand_as(mu))
    rho = spd_solve(sigma, mu[..., None])[..., 0]
    return rho, away_from_zero(omega - (mu * rho).sum(-1), delta_eps)


def spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """matrix^-1 rhs for batched symmetric positive definite matrices, by Cholesky and two triangular solves:
    no host sync and no cuSOLVER solve (``cholesky_solve`` is refused inside a CUDA graph capture, seen on
    an H200), so a decode step that calls it can be captured."""
    factor, _ = torch.linalg.cholesky_ex(matrix)  # _ex: no error check, so no host sync
    half = torch.linalg.solve_triangular(factor, rhs, upper=False)
    return torch.linalg.solve_triangular(factor.mT, half, upper=True)


def _weighted_scatter(w: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, max_chunk_elements: int):
    """sum_j w_j u_j u_j^T with u_j = k'_j - q' (centred on each query, as the reference: no cancellation):
    w [B, Hkv, G, T, L], keys [B, Hkv, L, D], rows [B, Hkv, G, T, D] -> [B, Hkv, G, T, D, D], over chunks of
    keys so the centred copy stays under ``max_chunk_elements``."""
    batch, num_kv_heads, group, num_q, num_keys = w.shape
    head_dim = keys.shape[-1]
    chunk = max(1, max_chunk_elements // (batch * num_kv_heads * group * num_q * head_dim))
    out = None
    for start in range(0, num_keys, chunk):
        u = keys[:, :, None, None, start:start + chunk] - rows[..., None, :]  # [B, Hkv, G, T, C, D]
        term = (w[..., start:start + chunk, None] * u).mT @ u
        out = term if out is None else out + term
    return out
