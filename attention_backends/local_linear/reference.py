"""Local Linear Attention in the fewest lines, in float64 with an explicit Sigma and torch.linalg.solve: the
spec that the blockwise torch path and the Triton kernel are tested against.

Per query i (causal: keys j <= i), s = scale (1/sqrt(D) usually):
    w_ij = exp(s q_i.k_j - m_i)                       m_i = max_j s q_i.k_j (cancels in o_i)
    omega_i = sum_j w_ij,   mu_i = sum_j w_ij (k_j - q_i)
    Sigma_i = sum_j w_ij (k_j - q_i)(k_j - q_i)^T + lambda omega_i I,   rho_i = Sigma_i^-1 mu_i
    delta_i = omega_i - mu_i.rho_i (+ delta_eps sign(delta_i), params.DELTA_EPS)
    o_i = sum_j w_ij [1 - rho_i.(k_j - q_i)] v_j / delta_i
This is the intercept of the ridge-regularised local linear fit of v on k - q_i weighted by w_ij; as
lambda -> inf, rho -> 0 and o_i is softmax attention. Symbols, the ridge lambda * omega and the sign-kept
delta_eps match FlashLLA's ``flashlla/ops/naive.py`` (which solves in fp32; this one in float64).

Shapes: q [T, Hq, D]; k, v [L, Hkv, D] with L >= T; the queries are the last T positions of the L keys
(decode: T = 1). Query head h reads kv head h // (Hq // Hkv); Sigma is per query head (w depends on q).
"""

from __future__ import annotations

import torch

from afterburner.attention_backends.local_linear.params import DELTA_EPS, away_from_zero, lambda_per_head


def ridge_terms(q: torch.Tensor, k: torch.Tensor, *, scale: float, lam: float | torch.Tensor):
    """float64 (w [Hq, T, L], u = k - q [Hq, T, L, D], rho [Hq, T, D], delta [Hq, T]), delta without eps."""
    num_q, num_heads, head_dim = q.shape
    num_k, num_kv_heads = k.shape[:2]
    qh = q.double().transpose(0, 1)  # [Hq, T, D]
    kh = k.double().transpose(0, 1).repeat_interleave(num_heads // num_kv_heads, 0)  # [Hq, L, D]
    positions = torch.arange(num_k, device=q.device)
    causal = positions[None, :] <= positions[num_k - num_q:, None]  # [T, L]
    scores = (scale * qh @ kh.mT).masked_fill(~causal, -torch.inf)
    w = torch.exp(scores - scores.amax(-1, keepdim=True))
    u = kh[:, None] - qh[:, :, None]  # [Hq, T, L, D]
    omega = w.sum(-1)
    mu = torch.einsum("htl,htld->htd", w, u)
    lam = lambda_per_head(lam, num_heads, dtype=torch.float64, device=q.device)[:, None, None, None]
    eye = torch.eye(head_dim, dtype=torch.float64, device=q.device)
    sigma = torch.einsum("htl,htld,htle->htde", w, u, u) + lam * omega[..., None, None] * eye
    rho = torch.linalg.solve(sigma, mu)
    return w, u, rho, omega - (mu * rho).sum(-1)


def local_linear_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                           lam: float | torch.Tensor, delta_eps: float = DELTA_EPS) -> torch.Tensor:
    """o [T, Hq, D] in float64 (shapes in the module docstring)."""
    w, u, rho, delta = ridge_terms(q, k, scale=scale, lam=lam)
    delta = away_from_zero(delta, delta_eps)
    vh = v.double().transpose(0, 1).repeat_interleave(q.shape[1] // v.shape[1], 0)  # [Hq, L, D]
    weights = w * (1 - torch.einsum("htd,htld->htl", rho, u)) / delta[..., None]
    return (weights @ vh).transpose(0, 1)
