"""Local Linear Attention for training: the blockwise forward with gradients through the CG solve by
implicit differentiation, not by unrolling CG.

rho solves Sigma(theta) rho = mu(theta), theta = (q, k, lambda). Differentiating,
    d rho = Sigma^-1 (d mu - d Sigma rho),
so for a loss gradient g = dL/d rho, with a = Sigma^-1 g (Sigma is symmetric),
    dL/d theta = a . (d mu / d theta - (d Sigma / d theta) rho).
That is the gradient of the residual r(theta) = mu(theta) - Sigma(theta) rho* (rho* held fixed) pushed
through a = Sigma^-1 g. So: solve for rho* without a graph (``conjugate_gradient`` under no_grad), form r
with one differentiable matrix-free product (``sigma_times``), and add ``_AdjointSolve(r)``, which is 0 in
the forward (r ~ 0 at the solution; the value used is rho* exactly) and whose backward is one more CG solve
with the same Sigma. Cost per call: the forward's passes plus one pass for r, and one CG solve backwards;
memory: the statistics and one pass's blocks, however many CG iterations run (unrolling CG through
autograd keeps every iteration's [H, T, L] weights, 32 of them at the default cap).

The gradient is exact at the exact solve; CG's stopping rule (``cg_rtol``) bounds its error the way it bounds
the forward's. Values equal ``blockwise.local_linear_blockwise`` with the same arguments (tested), and
gradients match autograd through ``reference.local_linear_reference`` in float64 (tested).
"""

from __future__ import annotations

import torch

from afterburner.attention_backends.local_linear.blockwise import (
    SoftmaxStats,
    _grouped,
    apply_weights,
    centred_mean,
    conjugate_gradient,
    sigma_diagonal,
    sigma_times,
    softmax_statistics,
)
from afterburner.attention_backends.local_linear.params import CG_ATOL, CG_MAX_ITERS, CG_RTOL, DELTA_EPS


class _AdjointSolve(torch.autograd.Function):
    """Forward: zeros like r. Backward: Sigma^-1 grad, by ``solve`` (CG on detached tensors)."""

    @staticmethod
    def forward(ctx, residual, solve):
        ctx.solve = solve
        return torch.zeros_like(residual)

    @staticmethod
    def backward(ctx, grad):
        return ctx.solve(grad), None


def _detached(stats: SoftmaxStats) -> SoftmaxStats:
    return SoftmaxStats(*(None if t is None else t.detach() for t in
                          (stats.m, stats.omega, stats.key_sum, stats.key_sq_sum)))


def local_linear_implicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                          lam: float | torch.Tensor, delta_eps: float = DELTA_EPS, block_size: int = 64,
                          cg_max_iters: int = CG_MAX_ITERS, cg_atol: float = CG_ATOL, cg_rtol: float = CG_RTOL,
                          jacobi: bool = False) -> torch.Tensor:
    """``local_linear_blockwise`` (same arguments and shapes: q [T, Hq, D], k, v [L, Hkv, D] -> [T, Hq, D])
    with gradients for q, k, v and a tensor ``lam`` ([Hq] or a scalar) through the solve."""
    rows, keys, values, lam_rows = _grouped(q, k, v, lam)
    stats = softmax_statistics(rows, keys, scale=scale, block_size=block_size, jacobi=jacobi)
    mu = centred_mean(rows, stats)
    fixed = (rows.detach(), keys.detach(), _detached(stats), lam_rows.detach())
    diagonal = sigma_diagonal(fixed[0], fixed[2], fixed[3]) if jacobi else None

    def solve(b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return conjugate_gradient(
                lambda x: sigma_times(x, *fixed[:3], fixed[3], scale=scale, block_size=block_size), b,
                diagonal=diagonal, max_iters=cg_max_iters, atol=cg_atol, rtol=cg_rtol)

    rho_star = solve(mu.detach())
    if torch.is_grad_enabled() and (mu.requires_grad or lam_rows.requires_grad):
        residual = mu - sigma_times(rho_star, rows, keys, stats, lam_rows, scale=scale, block_size=block_size)
        rho = rho_star + _AdjointSolve.apply(residual, solve)
    else:
        rho = rho_star
    out = apply_weights(rows, keys, values, stats, rho, scale=scale, block_size=block_size, delta_eps=delta_eps)
    return out.flatten(0, 1).transpose(0, 1).to(q.dtype)
